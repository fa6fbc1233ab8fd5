"""The standard services beside the participant: health (SERVING for the participant
service and the server as a whole while it serves, NOT_SERVING for both once it stops,
gracefully or because its barrier failed, so that a load balancer drains it) and
server reflection."""

import queue
import threading

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from treaty_participant._proto import participant_pb2 as pb

from .support import CALL_TIMEOUT_S, InProcessParticipant, TempDirTest, uuid7, wait_until

SERVICES = ("treaty.v1.Participant", "")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServedTest(TempDirTest):
    """One in-process participant, and a cleartext channel to it."""

    def setUp(self) -> None:
        super().setUp()
        self.server = InProcessParticipant(self.tmp / "participant.db")
        self.addCleanup(self.server.stop)
        self.channel = grpc.insecure_channel(self.server.target)
        self.addCleanup(self.channel.close)


class HealthTest(ServedTest):
    def setUp(self) -> None:
        super().setUp()
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def watch(self, service: str) -> "queue.Queue[int]":
        """The statuses a Watch of ``service`` reports, as they come."""
        statuses: "queue.Queue[int]" = queue.Queue()
        stream = self.health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
        self.addCleanup(stream.cancel)

        def read() -> None:
            try:
                for message in stream:
                    statuses.put(message.status)
            except grpc.RpcError:
                pass  # cancelled at cleanup, or the server went away

        threading.Thread(target=read, daemon=True).start()
        return statuses

    def assert_not_serving_after(self, stop) -> None:
        watches = {}
        for service in SERVICES:
            response = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
            self.assertEqual(response.status, SERVING, repr(service))
            watches[service] = self.watch(service)
            self.assertEqual(watches[service].get(timeout=CALL_TIMEOUT_S), SERVING, repr(service))
        stop()
        for service, statuses in watches.items():
            self.assertEqual(statuses.get(timeout=CALL_TIMEOUT_S), NOT_SERVING, repr(service))

    def test_a_graceful_stop_reports_not_serving(self):
        stopping = threading.Thread(target=lambda: self.server.handle.stop(grace_s=2), daemon=True)
        self.assert_not_serving_after(stopping.start)
        stopping.join(CALL_TIMEOUT_S)

    def test_a_failed_barrier_reports_not_serving(self):
        # What a COMMIT of a barrier record that failed reports; serve() then stops.
        self.assert_not_serving_after(lambda: self.server.barrier._fail("the disk went away (test)"))
        self.assertTrue(self.server.handle.wait(CALL_TIMEOUT_S))

    def test_an_unknown_service_is_not_found(self):
        with self.assertRaises(grpc.RpcError) as unknown:
            self.health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=CALL_TIMEOUT_S)
        self.assertEqual(unknown.exception.code(), grpc.StatusCode.NOT_FOUND)


class ReflectionTest(ServedTest):
    """Server reflection (v1alpha): a generic client such as grpcurl finds the services
    and the participant's descriptors without proto files."""

    def ask(self, request):
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        responses = stub.ServerReflectionInfo(iter([request]), timeout=CALL_TIMEOUT_S)
        return next(iter(responses))

    def test_the_services_and_the_participants_descriptors_are_reflected(self):
        listed = self.ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {service.name for service in listed.list_services_response.service}
        for name in ("treaty.v1.Participant", "grpc.health.v1.Health"):
            self.assertIn(name, names)
        files = self.ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol="treaty.v1.Participant"))
        descriptors = files.file_descriptor_response.file_descriptor_proto
        self.assertTrue(descriptors, files)
        parsed = descriptor_pb2.FileDescriptorProto.FromString(descriptors[0])
        self.assertEqual(parsed.package, "treaty.v1")


class ReflectionBoundTest(ServedTest):
    """Each reflection stream holds a worker thread while open: at most two are open at
    once, and the participant's calls are answered meanwhile."""

    def test_a_third_reflection_stream_is_refused_while_two_are_open(self):
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        held = []
        for _ in range(2):
            requests: "queue.Queue" = queue.Queue()
            requests.put(ask)
            stream = stub.ServerReflectionInfo(iter(requests.get, None), timeout=CALL_TIMEOUT_S)
            self.addCleanup(stream.cancel)
            next(stream)  # open, and served
            held.append((requests, stream))
        with self.assertRaises(grpc.RpcError) as refused:
            next(stub.ServerReflectionInfo(iter([ask]), timeout=CALL_TIMEOUT_S))
        self.assertEqual(refused.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        client = self.server.client()
        self.addCleanup(client.close)
        self.assertEqual(client.abort(uuid7(), "b").result, pb.ABORT_RESULT_ABORTED)
        # One closed: a new stream is served.
        requests, stream = held.pop()
        requests.put(None)
        for _ in stream:
            pass
        wait_until(lambda: _reflects(stub, ask), what="a reflection stream served again")


def _reflects(stub, ask) -> bool:
    try:
        next(stub.ServerReflectionInfo(iter([ask]), timeout=CALL_TIMEOUT_S))
        return True
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
