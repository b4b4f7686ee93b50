"""The app's side of teaching (the Train tab and the `train` endpoint), without Gradio: where taught
bundles are written, how many trainings run at once, how long a taught model lives, and the one
embedder every user shares.

The training code (classifier.teach: the backbone, run.prepare, loop.fit) is imported on the first
training, not when the app starts: a Space that is only used to classify never loads it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from classifier.teach_set import LIMITS, Limits, TeachingSet

# A taught model (its bundle, and its entry in the model menu) is deleted this long after it was
# made, or when its browser session ends, whichever comes first: a public Space's disk is not a store.
MODEL_LIFETIME_S = 2 * 3600
# Trainings that run at once in the whole app; the rest wait in Gradio's queue, which shows each
# person their place in it. Each is CPU-bound: two already share a 2-core Space's cores.
TRAININGS_AT_ONCE = 1
ROOT = Path(tempfile.gettempdir()) / "classifier-taught"


@dataclass
class TaughtModel:
    name: str  # as the model menu shows it
    bundle_dir: Path
    made: float  # time.time()
    result: object  # the classifier.teach.Taught


class Teacher:
    """Trains taught models for the app and keeps them for a while. `register(name, folder)` and
    `unregister(name)` are the app's model store's, so taught models appear in its menu."""

    def __init__(self, register: Callable[[str, str], None], unregister: Callable[[str], None],
                 root: str | Path = ROOT, limits: Limits = LIMITS, lifetime_s: float = MODEL_LIFETIME_S):
        self.root = Path(root)
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        self.limits, self.lifetime_s = limits, lifetime_s
        self._register, self._unregister = register, unregister
        self._models: dict[str, TaughtModel] = {}
        self._embedder = None
        self._lock = threading.Lock()
        self._stopping: set[str] = set()

    @property
    def uploads(self) -> Path:
        """Where unpacked zips go (served by the app, so the Train tab can show their thumbnails)."""
        return self.root / "uploads"

    def embedder(self):
        with self._lock:
            if self._embedder is None:
                from classifier.teach import Embedder
                self._embedder = Embedder()
            return self._embedder

    def teach(self, images: TeachingSet, progress=None) -> TaughtModel:
        """A new taught model from `images`, registered in the app's menu (DataError for a set that
        cannot be trained, with the reason)."""
        from classifier.teach import teach

        self.forget_expired()
        name = self._new_name(images)
        folder = self.root / name
        result = teach(images, folder, self.embedder(), progress or (lambda f, t: None), self.limits)
        return self._keep(name, folder, result)

    def train_longer(self, images: TeachingSet, model: TaughtModel, progress=None,
                     should_stop: Callable[[], bool] = lambda: False) -> TaughtModel:
        """`model` fine-tuned as a new taught model when that beat it on held-out images; else
        `model` again, its result's note saying why it was kept."""
        from classifier.teach import train_longer

        name = f"{model.name}-longer"
        folder, work = self.root / name, self.root / f"{name}-work"
        self._stopping.discard(model.name)
        try:
            result = train_longer(images, folder, work, self.embedder(), model.result, progress=progress
                                  or (lambda f, t: None), should_stop=should_stop, limits=self.limits)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # checkpoints of the fine-tuning: the bundle is what stays
        if result.bundle_dir != folder:
            return TaughtModel(model.name, model.bundle_dir, model.made, result)
        self.forget(model.name)
        return self._keep(name, folder, result)

    def request_stop(self, name: str | None) -> None:
        """Stop the fine-tuning of `name` after its current epoch (train_longer's should_stop)."""
        if name:
            self._stopping.add(name)

    def stop_requested(self, name: str) -> bool:
        return name in self._stopping

    def archive(self, model: TaughtModel) -> Path:
        """The bundle as a zip to download (made once)."""
        target = self.root / "downloads" / model.name
        zipped = target.with_suffix(".zip")
        if not zipped.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.make_archive(str(target), "zip", root_dir=model.bundle_dir.parent, base_dir=model.bundle_dir.name)
        return zipped

    def get(self, name: str) -> TaughtModel | None:
        return self._models.get(name)

    def forget(self, name: str) -> None:
        """Delete a taught model: its menu entry, its bundle and its download."""
        model = self._models.pop(name, None)
        if model is None:
            return
        self._unregister(name)
        shutil.rmtree(model.bundle_dir, ignore_errors=True)
        (self.root / "downloads" / f"{name}.zip").unlink(missing_ok=True)

    def forget_expired(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        old = [name for name, m in list(self._models.items()) if now - m.made > self.lifetime_s]
        for name in old:
            self.forget(name)
        return old

    def _new_name(self, images: TeachingSet) -> str:
        # Readable ("taught: cat, dog") and unique, so that two people's models never share a name.
        classes = re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(images))[:30]
        return f"taught-{classes}-{uuid.uuid4().hex[:6]}"

    def _keep(self, name: str, folder: Path, result) -> TaughtModel:
        model = TaughtModel(name, folder, time.time(), result)
        self._models[name] = model
        self._register(name, str(folder))
        return model
