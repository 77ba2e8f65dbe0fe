"""The servers of the local cluster, one class each, that `infra.cluster.LocalCluster` loops over.

base.py      what every server shares: the state dir, `Server` (ensure, probe), `Health`, `ClusterError`
postgres.py  the embedded PostgreSQL + pgvector            redis.py  the local (or configured) Redis
s3.py        SeaweedFS as the S3 server                     clients.py  the stage workers and the dashboard
"""
