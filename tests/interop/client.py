"""A consumer written in Python: calls bfb through stubs generated from
proto/ with grpcio-tools, with a deadline and metadata, and checks what comes
back. Run by tests/python_interop.rs: `client.py STUBS_DIR BFB_ADDR`.
Prints one line per check; exits non-zero on the first failure."""

import sys

sys.path.insert(0, sys.argv[1])
ADDR = sys.argv[2]

import grpc  # noqa: E402
from google.rpc import status_pb2  # noqa: E402,F401  (generated from proto/)
from bfb.customer.v1 import customer_aggregate_pb2 as c1  # noqa: E402
from bfb.customer.v1 import customer_aggregate_pb2_grpc as c1_grpc  # noqa: E402
from bfb.customer.v2 import customer_aggregate_pb2 as c2  # noqa: E402
from bfb.customer.v2 import customer_aggregate_pb2_grpc as c2_grpc  # noqa: E402
from bfb.activity.v1 import user_activity_pb2 as a1  # noqa: E402
from bfb.activity.v1 import user_activity_pb2_grpc as a1_grpc  # noqa: E402

METADATA = (("x-request-id", "python-interop-1"),)


def check(cond, what):
    if not cond:
        print("FAIL", what, flush=True)
        sys.exit(1)
    print("ok", what, flush=True)


with grpc.insecure_channel(ADDR) as channel:
    v1 = c1_grpc.CustomerAggregateServiceStub(channel)
    v2 = c2_grpc.CustomerAggregateServiceStub(channel)
    activity = a1_grpc.UserActivityServiceStub(channel)

    resp, call = v1.GetCustomer.with_call(
        c1.GetCustomerRequest(customer_id="c-42"), timeout=5, metadata=METADATA
    )
    check(resp.customer.customer_id == "c-42", "v1 GetCustomer id")
    check(resp.customer.profile.display_name != "", "v1 GetCustomer profile")
    check(not resp.status.degraded, "v1 GetCustomer not degraded")
    trailing = dict(call.initial_metadata())
    check(trailing.get("x-request-id") == "python-interop-1", "request id echoed")

    try:
        v1.GetCustomer(c1.GetCustomerRequest(customer_id="bad id"), timeout=5)
        check(False, "invalid id rejected")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, "invalid id rejected")

    # Errors stay small whatever the input: grpcio sees INVALID_ARGUMENT
    # with readable details, not its own "metadata size exceeds" failure.
    huge = [
        c1.GetCustomerRequest(customer_id="c-1", read_mask={"paths": ["x" * 10000]}),
        c1.GetCustomerRequest(customer_id="c-1", read_mask={"paths": ["x"] * 3000}),
    ]
    for i, req in enumerate(huge):
        try:
            v1.GetCustomer(req, timeout=5)
            check(False, "oversized input %d rejected" % i)
        except grpc.RpcError as e:
            size = len(e.details() or "") + sum(len(v) for _, v in e.trailing_metadata() or ())
            check(
                e.code() == grpc.StatusCode.INVALID_ARGUMENT and size < 4096,
                "oversized input %d: INVALID_ARGUMENT in %d bytes" % (i, size),
            )

    batch = v1.BatchGetCustomers(
        c1.BatchGetCustomersRequest(customer_ids=["c-1", "c-999999999", "c-3"]),
        timeout=5,
        metadata=METADATA,
    )
    check(len(batch.results) == 3, "v1 BatchGetCustomers one result per id")
    check(batch.results[0].customer.customer_id == "c-1" and batch.results[0].customer.profile.display_name, "v1 batch item 0")
    check(batch.results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0], "v1 batch item 1 NOT_FOUND")
    check(not batch.results[2].HasField("error"), "v1 batch item 2 ok")

    batch2 = v2.BatchGetCustomers(
        c2.BatchGetCustomersRequest(customer_ids=["c-1", "c-2"], page_size=3), timeout=5
    )
    check(len(batch2.results) == 2, "v2 BatchGetCustomers")
    orders = batch2.results[0].customer.orders
    check(len(orders.items) <= 3, "v2 first page of orders")
    check(all(o.total.currency_code for o in orders.items), "v2 money has a currency")

    users = a1.StreamUserActivityRequest(user_range=a1.UserRange(prefix="u-", first=1, count=50))
    seen = [m.user_id for m in activity.StreamUserActivity(users, timeout=10, metadata=METADATA)]
    check(seen == ["u-%d" % n for n in range(1, 51)], "StreamUserActivity in order")

print("done", flush=True)
