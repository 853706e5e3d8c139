"""Python snippets the VM tests run inside the guest (``Vm.run(code, **params)``).

Each sees its params as globals and sets ``result``. Shared here because the harness tests
(in-memory peer on the host) and the end-to-end tests (connector and Artemis) run the same
guest programs against different host sides.
"""

# Send n messages at-least-once, receive them back, make one request/response round trip.
# Params: port, cid (container-id), queue, n, service.
ROUND_TRIP = """
from connector.guest import GuestClient
with GuestClient(port, container_id=cid) as c:
    outcomes = c.send(queue, [f"m{i}" for i in range(n)])
    got = c.receive(queue, n)
    reply = c.request(service, "ping")
    result = {"accepted": [o.state for o in outcomes].count("accepted"),
              "bodies": [m.body for m in got] == [f"m{i}" for i in range(n)],
              "reply": reply.body}
"""

# Guest throughput: n messages of 1 KiB at-least-once, after a warm-up. Params: port, queue, n.
THROUGHPUT = """
import time
from connector.guest import GuestClient
with GuestClient(port) as c:
    c.send(queue, ["warm-up"])
    started = time.monotonic()
    outcomes = c.send(queue, [b"x" * 1024] * n)
    result = {"accepted": [o.state for o in outcomes].count("accepted"),
              "seconds": time.monotonic() - started}
"""

# An unmodified TCP client (proton's BlockingConnection) through the bridge, twice in turn
# so the second client must find the port clean. Params: port, queue, n.
BRIDGE_CLIENT = """
import threading
from proton import Message
from proton.utils import BlockingConnection
from connector.guest.bridge import Bridge

bridge = Bridge(("127.0.0.1", 0), [port])
stop = threading.Event()
def serve():
    while not stop.is_set():
        bridge.poll(0.1)
    bridge.close()
t = threading.Thread(target=serve)
t.start()
result = []
try:
    for _ in range(2):
        conn = BlockingConnection("amqp://127.0.0.1:%d" % bridge.address[1], timeout=60)
        snd = conn.create_sender(queue)
        for i in range(n):
            snd.send(Message(body=i))
        rcv = conn.create_receiver(queue)
        for _ in range(n):
            result.append(rcv.receive(timeout=60).body)
            rcv.accept()
        conn.close()
finally:
    stop.set()
    t.join()
"""

# An unchanged-style MessagingHandler on the driver, across a host-side outage: it sends one
# message per (re)attach and stops after two accepted; each outcome and each disconnect it
# sees is appended to /work/accepted and /work/disconnects (the host can wait for them).
# Params: port, queue, idle, limit.
RECONNECT = """
from proton import Message
from proton.handlers import MessagingHandler
from connector.guest import Driver

class App(MessagingHandler):
    def __init__(self):
        super().__init__()
        self.opened = self.accepted = self.disconnects = 0
    def on_start(self, event):
        event.container.create_sender(queue)
        self.timer = event.container.schedule(limit, self)
    def on_link_opened(self, event):
        self.opened += 1
        event.sender.send(Message(body=f"n{self.opened}"))
    def on_accepted(self, event):
        self.accepted += 1
        with open("/work/accepted", "a") as f:
            f.write("x\\n")
        if self.accepted == 2:
            self.timer.cancel()
            event.connection.close()
    def on_disconnected(self, event):
        self.disconnects += 1
        with open("/work/disconnects", "a") as f:
            f.write("x\\n")
    def on_timer_task(self, event):
        event.container.stop()

app = App()
Driver(app, port, idle_timeout=idle).run()
result = {"opened": app.opened, "accepted": app.accepted, "disconnects": app.disconnects}
"""

# Local transactions from a MessagingHandler on the driver (declare_transaction, as with
# Container): one transaction aborted, then one committed. Params: port, queue.
TRANSACTIONS = """
from proton import Message
from proton.handlers import MessagingHandler, TransactionHandler
from connector.guest import Driver

class TxSend(MessagingHandler, TransactionHandler):
    def __init__(self):
        super().__init__()
        self.plan = [("abort", ["a0", "a1"]), ("commit", ["c0", "c1"])]
        self.done = []
    def on_start(self, event):
        self.container = event.container
        self.conn = event.container.connect()
        self.sender = event.container.create_sender(self.conn, queue)
        self.timer = event.container.schedule(60, self)
        self.container.declare_transaction(self.conn, handler=self)
    def on_transaction_declared(self, event):
        action, bodies = self.plan[len(self.done)]
        for body in bodies:
            event.transaction.send(self.sender, Message(body=body))
        getattr(event.transaction, action)()
    def discharged(self, what):
        self.done.append(what)
        if len(self.done) < len(self.plan):
            self.container.declare_transaction(self.conn, handler=self)
        else:
            self.timer.cancel()
            self.conn.close()
    def on_transaction_aborted(self, event):
        self.discharged("aborted")
    def on_transaction_committed(self, event):
        self.discharged("committed")
    def on_timer_task(self, event):
        event.container.stop()

app = TxSend()
Driver(app, port).run()
result = app.done
"""
