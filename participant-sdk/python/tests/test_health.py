"""The standard health service beside the participant: SERVING for the participant
service and the server as a whole while it serves, NOT_SERVING for both once it stops,
gracefully or because its barrier failed, so that a load balancer drains it."""

import queue
import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .support import CALL_TIMEOUT_S, InProcessParticipant, TempDirTest

SERVICES = ("treaty.v1.Participant", "")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthTest(TempDirTest):
    def setUp(self) -> None:
        super().setUp()
        self.server = InProcessParticipant(self.tmp / "participant.db")
        self.addCleanup(self.server.stop)
        self.channel = grpc.insecure_channel(self.server.target)
        self.addCleanup(self.channel.close)
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
