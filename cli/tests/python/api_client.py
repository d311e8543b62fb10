"""A client of Flotilla's API generated with grpcio-tools from the repository's .proto files.

Usage: api_client.py SERVER GENERATED_DIR

Creates a Deployment, lists it, and sees a watch event for a change to it. Exits non-zero
with a message on any failure.
"""

import sys
import threading

SERVER, GENERATED = sys.argv[1], sys.argv[2]
sys.path.insert(0, GENERATED)

import grpc  # noqa: E402
from flotilla.api.v1 import apps_pb2, core_pb2, meta_pb2, services_pb2_grpc  # noqa: E402

channel = grpc.insecure_channel(SERVER)
grpc.channel_ready_future(channel).result(timeout=30)
deployments = services_pb2_grpc.DeploymentsStub(channel)

labels = {"app": "py-web"}
deployment = apps_pb2.Deployment(
    api_version="apps/v1",
    kind="Deployment",
    metadata=meta_pb2.ObjectMeta(name="py-web", namespace="default", labels=labels),
    spec=apps_pb2.DeploymentSpec(
        replicas=2,
        selector=meta_pb2.LabelSelector(match_labels=labels),
        template=core_pb2.PodTemplateSpec(
            metadata=meta_pb2.ObjectMeta(labels=labels),
            spec=core_pb2.PodSpec(
                containers=[core_pb2.Container(name="web", command=["python3", "-m", "http.server"])]
            ),
        ),
    ),
)
created = deployments.Create(deployment, timeout=30)
assert created.metadata.uid, "the server assigns a uid"
assert created.metadata.generation == 1, created.metadata.generation
assert created.spec.strategy.type == "RollingUpdate", "defaults are filled in"

listed = deployments.List(meta_pb2.ListRequest(namespace="default", label_selector="app=py-web"), timeout=30)
assert [d.metadata.name for d in listed.items] == ["py-web"], listed
revision = listed.metadata.resource_version

events = []
seen = threading.Event()


def follow():
    stream = deployments.Watch(
        meta_pb2.WatchRequest(namespace="default", resource_version=revision), timeout=60
    )
    for event in stream:
        events.append(event)
        # The patch's event (the controllers also write the deployment's status).
        if event.type == "MODIFIED" and event.object.spec.replicas == 3:
            seen.set()
            stream.cancel()
            return


watcher = threading.Thread(target=follow, daemon=True)
watcher.start()
patched = deployments.Patch(
    meta_pb2.PatchRequest(namespace="default", name="py-web", patch='{"spec": {"replicas": 3}}'),
    timeout=30,
)
assert patched.spec.replicas == 3, patched.spec
assert seen.wait(30), f"no MODIFIED event within 30 s; saw {events}"
modified = [e for e in events if e.type == "MODIFIED" and e.object.spec.replicas == 3][0]
assert modified.object.spec.replicas == 3, modified
assert modified.object.metadata.resource_version == patched.metadata.resource_version

# A stale update is refused with ABORTED.
try:
    deployments.Update(created, timeout=30)
    raise AssertionError("a stale update was accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.ABORTED, e

print("python client: create, list, watch, patch and conflict all behave")
