"""`gptswarm worker`: lend this machine to a swarm."""

import logging
import signal

import click


@click.command()
@click.option("--join", required=True, metavar="HOST:PORT", help="The coordinator's address, as it printed it.")
@click.option("--token", envvar="GPTSWARM_TOKEN", default="", help="The swarm token from the operator "
              "(or set GPTSWARM_TOKEN).")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU if there is one), cpu, cuda or cuda:N.")
@click.option("--name", help="Public name shown on the swarm's status page (default: this host's name).")
@click.option("--p2p-listen", metavar="HOST:PORT", help="Accept hivemind DHT connections on this address (a "
              "reachable worker strengthens the swarm's DHT). Default: client mode, nothing to open in your firewall.")
@click.option("--announce-host", help="Public host name or IP for --p2p-listen, when behind port forwarding.")
@click.option("--threads", type=int, help="CPU threads for training on the CPU (default: all).")
def worker(join, token, device, name, p2p_listen, announce_host, threads):
    """Join a swarm and train with it until Ctrl+C: lease data shards from the coordinator, train
    the shared GPT on them, and average what was learned with the other workers every round.
    Ctrl+C gives the current leases back and leaves within seconds."""
    import torch

    from gptswarm.coordinator.cli import setup_logging
    from gptswarm.worker.loop import Worker

    setup_logging()
    if threads:
        torch.set_num_threads(threads)
    w = Worker(join, token, device, name, p2p_listen, announce_host)
    pressed = []

    def on_signal(*_):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(1)
        logging.getLogger("gptswarm.worker").info("stopping: returning leases and leaving (Ctrl+C again to force)")
        w.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    w.run()
