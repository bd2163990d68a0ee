"""The embedded broker: kombu's filesystem transport, creating its folders.

The stock transport expects its folders to exist. Creating them when a
channel opens — not when the settings are read — means importing the app
never writes anything, and the folders appear wherever ``DCM_HOME`` points
when the broker is first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kombu.transport import filesystem


class Channel(filesystem.Channel):
    def __init__(self, connection: Any, **kwargs: Any) -> None:
        options = connection.client.transport_options or {}
        for key in ("data_folder_in", "data_folder_out", "control_folder", "processed_folder"):
            if options.get(key):
                Path(options[key]).mkdir(parents=True, exist_ok=True)
        super().__init__(connection, **kwargs)


class Transport(filesystem.Transport):
    Channel = Channel
