"""Logging for the long-running commands (coordinator, worker): readable lines for a terminal, or
one JSON object per line for a service manager (--json-logs)."""

import json
import logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line (journald, Loki, ...); fields passed as `extra={"fields": {...}}`
    are included."""

    def format(self, record):
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(json_logs=False):
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else
                         logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for noisy in ("hivemind", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # a reducer given no part (client-mode peers reduce nothing) warns about it every round
    logging.getLogger("hivemind.averaging.partition").setLevel(logging.ERROR)
