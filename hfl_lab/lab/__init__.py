"""The lab's steps as the notebooks call them: each notebook is narration plus a few of these.

    00 preflight            run_preflight(config)
    01 CoCo stack           coco_stack(config, apply=...)
    02 trust & volume       LabTrustService.start(config), create_model_volume(trust)
    03 image                measure_image(config)
    04 training             run_training(config)
    05 retrieval            session_run(config), ensure_trained(...), retrieve_and_evaluate(...)
    06 attacks & defenses   run_attacks(trust), AttestationBoard(folder)
    hfl-lab host / join     HostedRun(config, address=..., slots=N).start(), join_run(link)
    07 workshop             host_workshop(config, ...), JoinLinks(run.links.values()),
                            LocalJoiners.start(run), watch_workshop(run, joiners)
    join --kubernetes       join_kubernetes(link, out_dir, RemoteWorkerSite(...))
    hfl-lab run             run_lab(config)
"""

from hfl_lab.backends import create_backend
from hfl_lab.lab.attacks import ATTACKS, AttackOutcome, AttackReport, run_attacks
from hfl_lab.lab.board import AttestationBoard
from hfl_lab.lab.coco import CocoPlan, coco_stack
from hfl_lab.lab.image import ImageReport, measure_image
from hfl_lab.lab.joining import RemoteWorkerSite, join_kubernetes, join_run
from hfl_lab.lab.notebook import Table, brief_errors, show, show_image
from hfl_lab.lab.preflight import PreflightReport, run_preflight
from hfl_lab.lab.retrieval import RetrievalReport, retrieve_and_evaluate
from hfl_lab.lab.sequence import NOTEBOOKS, LabRun, run_lab
from hfl_lab.lab.session import session_run
from hfl_lab.lab.stand_ins import LocalJoiners
from hfl_lab.lab.training import TrainingOutcome, ensure_trained, run_training
from hfl_lab.lab.trust import LabTrustService, VerdictView, VolumeReport, create_model_volume
from hfl_lab.lab.workshop import HostedRun
from hfl_lab.lab.workshop_view import JoinLinks, WorkshopOutcome, host_workshop, watch_workshop

__all__ = [
    "ATTACKS",
    "NOTEBOOKS",
    "AttackOutcome",
    "AttackReport",
    "AttestationBoard",
    "CocoPlan",
    "HostedRun",
    "ImageReport",
    "JoinLinks",
    "LabRun",
    "LabTrustService",
    "LocalJoiners",
    "PreflightReport",
    "RemoteWorkerSite",
    "RetrievalReport",
    "Table",
    "TrainingOutcome",
    "VerdictView",
    "VolumeReport",
    "WorkshopOutcome",
    "brief_errors",
    "coco_stack",
    "create_backend",
    "create_model_volume",
    "ensure_trained",
    "host_workshop",
    "join_kubernetes",
    "join_run",
    "measure_image",
    "retrieve_and_evaluate",
    "run_attacks",
    "run_lab",
    "run_preflight",
    "run_training",
    "session_run",
    "show",
    "show_image",
    "watch_workshop",
]
