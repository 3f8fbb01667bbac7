"""sandboxd guest agent: the init process (PID 1) of every sandbox.

Started as ``protocol.AGENT_ARGV`` by the template's own Python (standard library only;
never imports the ``sandboxd`` package). This file stays tiny on purpose: a script is
compiled on every start, while the sibling modules it imports come from ``__pycache__``
when one was shipped next to them.

Usage (tests run it on the host as an ordinary process)::

    python3 agent.py [--run-dir DIR] [--listen HOST:PORT] [--workspace DIR] [--boot-port DEV]
"""

import os
import sys

if __name__ == "__main__":
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path[:1] != [_here]:
        sys.path.insert(0, _here)
    from _agent import main

    sys.exit(main(sys.argv[1:]))
