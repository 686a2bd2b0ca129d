"""What every tab shares: the runs dir, the job manager, the live watchers and the summary cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app.views.monitor import Watchers
from app.views.runs_index import SummaryCache
from trainer.chat.engine import ChatEngine
from trainer.config.paths import page_roots
from trainer.jobs.queue import JobManager
from trainer.jobs.registry import Job

DEFAULT_EXAMPLE = "examples/smollm2-persona.yaml"  # what a fresh page starts with: the real model + persona data


@dataclass
class AppContext:
    runs_dir: Path
    manager: JobManager
    example: str | None = DEFAULT_EXAMPLE
    watchers: Watchers = field(default_factory=Watchers)
    summaries: SummaryCache = field(default_factory=SummaryCache)
    chat: ChatEngine = field(default_factory=ChatEngine)  # one chat model for every page
    data_dirs: list[Path] = field(default_factory=list)  # `lora-workbench ui --data-dir`: more dirs the page reads

    @property
    def roots(self) -> list[Path]:
        """Where paths typed into the page (data, adapters, bases, outputs) must lie: the one definition."""
        return page_roots(self.runs_dir, self.data_dirs)

    def run_path(self, run_id: str) -> Path | None:
        """The directory of a registered run, or None (never a path built from page input)."""
        job = self.manager.registry.get(run_id) if run_id else None
        return Path(job.run_dir) if job else None

    def jobs_newest_first(self, kind: str = "train") -> list[Job]:
        """Jobs of one kind (training runs by default; export/evaluate jobs have their own lists)."""
        return [j for j in reversed(self.manager.registry.all()) if j.kind == kind]

    def run_to_watch(self) -> str | None:
        """What a freshly loaded page monitors: the running job, else the next queued, else the newest."""
        jobs = self.jobs_newest_first()
        for state in ("running", "queued"):
            matching = [j for j in jobs if j.state == state]
            if matching:
                return matching[-1].id  # the oldest running/queued one is the one making progress first
        return jobs[0].id if jobs else None

    @property
    def downloads_dir(self) -> Path:
        return self.runs_dir / ".downloads"
