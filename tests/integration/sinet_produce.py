"""Publishes messages with the real SINETStream producer (MessageWriter, Kafka plugin).

usage: python sinet_produce.py BROKER TOPIC PARAMS_JSON < messages.json
messages.json: [{"payload_hex": "...", "tstamp_us": 123}, ...]; PARAMS_JSON: extra service
parameters (message_format, data_compression, ...). Runs in its own working directory because
SINETStream reads its configuration from .sinetstream_config.yml there.
"""
import json
import os
import sys
import tempfile
from fractions import Fraction

import yaml
from sinetstream import MessageWriter

broker, topic, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
messages = json.load(sys.stdin)
os.chdir(tempfile.mkdtemp())
config = {"header": {"version": 2}, "config": {"svc": dict(
    type="kafka", brokers=broker, topic=topic, value_type="byte_array", consistency="AT_LEAST_ONCE", **params)}}
with open(".sinetstream_config.yml", "w") as f:
    f.write(yaml.safe_dump(config))
with MessageWriter(service="svc") as writer:
    for m in messages:
        writer.publish(bytes.fromhex(m["payload_hex"]), timestamp=Fraction(m["tstamp_us"], 1_000_000))
print(len(messages))
