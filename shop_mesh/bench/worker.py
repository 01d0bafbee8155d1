"""Entry point of a load-generator worker process: `python -m shop_mesh.bench.worker <socket fd>`."""

from shop_mesh.bench.loadgen import worker_entry

if __name__ == "__main__":
    worker_entry()
