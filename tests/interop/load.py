"""Steady GetCustomer load from a real gRPC client (Python grpcio), for
tests/fleet.rs: `load.py STUBS TARGET SECONDS WORKERS [ID]`.

Each worker calls GetCustomer in a loop (ids c-1..c-500, or only ID when
given) with a 2 s deadline. Prints `progress N` after every 100 calls and
`fail UNIX_MS CODE` for each failed call, then one `summary JSON` line with
the calls made and the failures by code. A failure line ends with
grpcio's details, for the test's report.
"""
import json
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
from bfb.customer.v1 import customer_aggregate_pb2 as customer_pb2  # noqa: E402
from bfb.customer.v1 import customer_aggregate_pb2_grpc as customer_pb2_grpc  # noqa: E402

target, seconds, workers = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
only = sys.argv[5] if len(sys.argv) > 5 else None
lock = threading.Lock()
calls = 0
failures = {}
until = time.time() + seconds


def worker(n):
    global calls
    channel = grpc.insecure_channel(target)
    stub = customer_pb2_grpc.CustomerAggregateServiceStub(channel)
    i = n
    while time.time() < until:
        cid = only or f"c-{i % 500 + 1}"
        try:
            stub.GetCustomer(customer_pb2.GetCustomerRequest(customer_id=cid), timeout=2)
        except grpc.RpcError as e:
            code = e.code().name
            with lock:
                failures[code] = failures.get(code, 0) + 1
                details = (e.details() or "").replace("\n", " ")
                print(f"fail {int(time.time() * 1000)} {code} {details}", flush=True)
        with lock:
            calls += 1
            if calls % 100 == 0:
                print(f"progress {calls}", flush=True)
        i += workers
    channel.close()


threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("summary " + json.dumps({"calls": calls, "failures": failures}), flush=True)
