"""A Redis consumer that is SIGKILLed the instant it has taken a message off its queue.

`python -m tests.dies_taking_a_message BROKER_URL QUEUE kept|upstream` consumes QUEUE the
way a worker's main process does (kombu's Redis channel, patched by common.kombu_fixes with
`delivery_kept` or not) and kills itself when kombu goes to record the message it took as
unacknowledged: the instant between the two round trips that a chaos kill once hit
(common.kombu_fixes, "A message a worker takes"). It exits -9 once it took one; 3 if none
came within 60 s.
"""

import os
import signal
import sys

from kombu import Connection, Queue
from kombu.transport import redis as kombu_redis

from common import kombu_fixes


def main(broker_url: str, queue: str, mode: str) -> int:
    kombu_fixes.apply(delivery_kept=[queue] if mode == "kept" else [])
    kombu_redis.QoS.append = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
    with Connection(broker_url, transport_options={"priority_steps": [0]}) as connection:
        with connection.Consumer([Queue(queue, no_declare=True)], callbacks=[lambda *_: None]):
            print("consuming", flush=True)
            try:
                connection.drain_events(timeout=60)
            except TimeoutError:
                return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
