"""Manifests of the small mesh the console tests draw (a client, a store with two versions
split 90/10, a VM-backed warehouse), as text for ``POST /v1/apply``."""

from __future__ import annotations

MESH = """
apiVersion: smc.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: smc-system}
spec: {permissiveTrafficMode: false, trustDomain: cluster.local}
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: bookstore, namespace: shop}
spec:
  backing: vm
  selector: {app: bookstore}
  ports: [{name: http, port: 8080, protocol: http}]
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: bookstore-v1, namespace: shop}
spec:
  backing: vm
  selector: {app: bookstore, version: v1}
  ports: [{name: http, port: 8080, protocol: http}]
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: bookstore-v2, namespace: shop}
spec:
  backing: vm
  selector: {app: bookstore, version: v2}
  ports: [{name: http, port: 8080, protocol: http}]
---
apiVersion: smc.dev/v1alpha1
kind: MeshService
metadata: {name: warehouse, namespace: shop}
spec:
  backing: vm
  selector: {app: warehouse}
  ports: [{name: http, port: 8081, protocol: http}]
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: buyer-1, namespace: shop, labels: {app: buyer}}
spec: {address: 127.0.0.21, serviceAccount: buyer, ports: [{name: http, port: 9000, protocol: http}]}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: store-v1, namespace: shop, labels: {app: bookstore, version: v1}}
spec: {address: 127.0.0.22, serviceAccount: bookstore, ports: [{name: http, port: 8080, protocol: http}]}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: store-v2, namespace: shop, labels: {app: bookstore, version: v2}}
spec: {address: 127.0.0.23, serviceAccount: bookstore, ports: [{name: http, port: 8080, protocol: http}]}
---
apiVersion: smc.dev/v1alpha1
kind: VirtualMachine
metadata: {name: warehouse-1, namespace: shop, labels: {app: warehouse}}
spec: {address: 127.0.0.24, serviceAccount: warehouse, ports: [{name: http, port: 8081, protocol: http}]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: store-routes, namespace: shop}
spec:
  matches:
  - {name: books, pathRegex: /books, methods: [GET]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: buyer-to-store, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: bookstore, namespace: shop}
  rules: [{kind: HTTPRouteGroup, name: store-routes, matches: [books]}]
  sources: [{kind: ServiceAccount, name: buyer, namespace: shop}]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: store-split, namespace: shop}
spec:
  service: bookstore
  backends: [{service: bookstore-v1, weight: 90}, {service: bookstore-v2, weight: 10}]
"""

#: Lets the store reach the warehouse (applied later, to watch it arrive).
STORE_TO_WAREHOUSE = """
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: store-to-warehouse, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: warehouse, namespace: shop}
  rules: [{kind: HTTPRouteGroup, name: store-routes}]
  sources: [{kind: ServiceAccount, name: bookstore, namespace: shop}]
"""

#: The buyer's grant narrowed to POST (an edit of buyer-to-store).
BUYER_POST_ONLY = """
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: store-post, namespace: shop}
spec:
  matches:
  - {name: post, pathRegex: /books, methods: [POST]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: buyer-to-store, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: bookstore, namespace: shop}
  rules: [{kind: HTTPRouteGroup, name: store-post}]
  sources: [{kind: ServiceAccount, name: buyer, namespace: shop}]
"""
