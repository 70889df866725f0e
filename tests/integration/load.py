"""Load for the integration tests: SINETStream records, and a producer that keeps writing them."""
import random
import threading
import time

import confluent_kafka as ck


def v3_message(tstamp_us, payload):
    """A SINETStream v3 message (key version 0) as MessageWriter writes it."""
    def zigzag(v):
        n, out = (v << 1) ^ (v >> 63), bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)
    return bytes.fromhex("df0300000000c3011f9c0c91eb33664f") + zigzag(tstamp_us) + zigzag(len(payload)) + payload


class Producer(threading.Thread):
    """Writes SINETStream v3 records at `rate` per second, round robin over the partitions, until
    stop(). Payload sizes are drawn from `sizes`; every `undecodable_every`-th record (if set) is
    raw bytes without an envelope. With `delivered` (a list), each record the broker acknowledged is
    appended to it as (partition, offset, timestamp_ms, value), as its delivery report arrives."""

    def __init__(self, bootstrap, topic, partitions, rate, sizes=(1024,), undecodable_every=0, seed=3,
                 delivered=None):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.partitions, self.rate = bootstrap, topic, partitions, rate
        self.sizes, self.undecodable_every, self.rng = sizes, undecodable_every, random.Random(seed)
        self.stop_event, self.count, self.error = threading.Event(), 0, None
        self.delivered, self.delivery_errors = delivered, []

    def run(self):
        p = ck.Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "log_level": 2})
        report = {} if self.delivered is None else {"on_delivery": self._on_delivery}
        try:
            while not self.stop_event.is_set():
                tick = time.time()
                for _ in range(self.rate // 10):
                    i, payload = self.count, self.rng.randbytes(self.rng.choice(self.sizes))
                    raw = self.undecodable_every and i % self.undecodable_every == 0
                    value = payload if raw else v3_message(1650250000000000 + i, payload)
                    p.produce(self.topic, value=value, partition=i % self.partitions, timestamp=int(tick * 1000),
                              **report)
                    self.count += 1
                p.poll(0)
                time.sleep(max(0.0, 0.1 - (time.time() - tick)))
            assert p.flush(60) == 0, "records left unsent"
        except Exception as e:  # reported by stop()
            self.error = e

    def _on_delivery(self, err, msg):
        """Called from poll() and flush() on this thread, in each partition's offset order."""
        if err is not None:
            self.delivery_errors.append(err)
        else:
            self.delivered.append((msg.partition(), msg.offset(), msg.timestamp()[1], msg.value()))

    def stop(self):
        """Stops, waits until every record is delivered, returns how many were produced."""
        self.stop_event.set()
        self.join()
        assert self.error is None, self.error
        return self.count
