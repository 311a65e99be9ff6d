"""Build hook: a wheel carries the model bundles of ``models/`` inside the ``service`` package
(``service/_models/<bundle>/...``), so that a non-editable install serves its default bundle
(``service.settings.DEFAULT_BUNDLE``). The source checkout and editable installs read
``models/`` where it is. Everything else is declared in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODELS = Path(__file__).resolve().parent / "models"


class BuildPyWithModels(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "service" / "_models"
        for source in sorted(MODELS.rglob("*")):
            if source.is_file() and "__pycache__" not in source.parts:
                destination = target / source.relative_to(MODELS)
                self.mkpath(str(destination.parent))
                self.copy_file(str(source), str(destination))


setup(cmdclass={"build_py": BuildPyWithModels})
