"""Entry point of a load-generator worker process: `python -m bench.worker <socket fd>`."""

from bench.loadgen import worker_entry

if __name__ == "__main__":
    worker_entry()
