"""shop-mesh: the services (shop_mesh.services), the mesh tooling (shop_mesh.mesh) and the benchmarks
(shop_mesh.bench). Client teams install shop-mesh-api (package `shop`) instead."""
