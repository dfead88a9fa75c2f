"""sntrack publish-sample — publish a synthetic study through the confirming, spooling EventPublisher."""

from __future__ import annotations

import argparse
import sys
import time

from common.errors import ConfigurationError
from producer.emitter import producer_info
from producer.publisher import EventPublisher
from producer.sample import synthetic_study
from sntrack.progress import Progress
from sntrack.settings import Settings


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _sn_effect(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be between -1 and 2, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "publish-sample", help="publish a synthetic study (demos, tests, benchmarks)",
        description="Publish realistic synthetic trials (start, one metric per epoch, stop; both spectral-norm "
        "arms; completed, pruned and failed outcomes) to ml.events with publisher confirms. Events the broker "
        "cannot take are spooled durably under SNTRACK_SPOOL_DIR and delivered later. Exits 0 when every event "
        "was confirmed or spooled. Both arms are drawn from the same distribution unless --sn-effect is given, "
        "so a report on sample data shows no spectral-norm difference by default.")
    parser.add_argument("--trials", type=_positive_int, default=10, metavar="N", help="trials (default 10)")
    parser.add_argument("--epochs", type=_positive_int, default=20, metavar="E", help="epochs per trial (default 20)")
    parser.add_argument("--rate", type=_positive_float, metavar="R", help="pace at R events/s (default: as fast as "
                        "possible)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed of the study (default 0)")
    parser.add_argument("--sn-effect", type=_sn_effect, default=0.0, metavar="K",
                        help="build a spectral-norm effect into the data: the SN arm gets K x (+0.005 accuracy "
                        "ceiling, -50%% validation noise, +8%% duration); default 0: no built-in difference; 1: "
                        "the advantage earlier versions always built in; negative: SN is worse; -1 to 2")
    parser.add_argument("--run-id", metavar="ID", help="model_run_id of the study (default: sample-<random>)")
    parser.add_argument("--timeout", type=_positive_float, default=60.0, metavar="SECONDS",
                        help="how long to wait at the end for confirms (default 60)")
    parser.set_defaults(run=_publish_sample)


def _publish_sample(args: argparse.Namespace, settings: Settings) -> int:
    study = synthetic_study(args.trials, args.epochs, seed=args.seed, producer=producer_info(settings.worker_id),
                            model_run_id=args.run_id, sn_effect=args.sn_effect)
    events = [event for trial in study for event in trial]
    started = time.perf_counter()
    publisher = EventPublisher(settings.publisher()).start()
    if refusal := publisher.first_contact():
        publisher.close(0)
        raise ConfigurationError(refusal)
    with Progress("publish", unit="events") as progress:
        for done, event in enumerate(events):
            if args.rate:
                ahead = started + done / args.rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            publisher.publish(event)
            progress.update(done + 1, len(events))
    settled = publisher.close(timeout=args.timeout)
    elapsed = time.perf_counter() - started
    stats = publisher.stats
    print(f"published {len(events)} events of {args.trials} trials in {elapsed:.2f}s "
          f"({len(events) / elapsed:,.0f} events/s): {stats.confirmed} confirmed, {stats.spooled} spooled, "
          f"{stats.flushed_from_spool} delivered from the spool")
    if not settled:
        print(f"sntrack: {stats.pending} events were neither confirmed nor spooled within {args.timeout:g}s",
              file=sys.stderr)
        return 1
    if stats.spooled > stats.flushed_from_spool:
        print(f"some events are still spooled in {settings.spool_dir}; the next publisher or "
              "`sntrack spool flush` delivers them", file=sys.stderr)
    return 0
