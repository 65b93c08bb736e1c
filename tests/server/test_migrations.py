"""The Alembic chain stays linear and named as docs/contracts.md says: parallel work that forgets to
re-chain a migration shows up here, not as a server that refuses to start."""

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from dstack.server.migrate import MIGRATIONS_DIR


def _scripts() -> ScriptDirectory:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg)


def test_one_head() -> None:
    heads = _scripts().get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"


def test_chain_follows_file_order() -> None:
    files = sorted(p.stem for p in (Path(MIGRATIONS_DIR) / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))
    scripts = _scripts()
    previous = None
    for stem in files:
        rev = scripts.get_revision(stem)
        assert rev is not None, f"{stem}.py: revision id is not the file name"
        assert rev.down_revision == previous, f"{stem}.py: down_revision {rev.down_revision!r}, expected {previous!r}"
        previous = stem
