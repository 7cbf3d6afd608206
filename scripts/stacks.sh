# Shared by scripts/test and scripts/demo (sourced, not run): the pinned stacks, how to
# find their Pythons and how to build their virtualenvs.
#
#   stack    Python  venv           constraints             runs
#   newest   3.13    .venv-newest   constraints/newest.txt  ruff, mypy, every scenario
#   lts      3.12    .venv-lts      constraints/lts.txt     scenarios marked `compat`
#   oldest   3.10    .venv-oldest   constraints/oldest.txt  scenarios marked `compat`
#
# A Python is looked for in $PYTHON_<stack> (e.g. PYTHON_NEWEST=/opt/py313/bin/python3),
# ~/.pyenv/versions/X.Y*/, then pythonX.Y on PATH. When it is missing, the stack runs on
# the nearest supported Python that is present, with a WARNING (repeated at the end of
# scripts/test); LIFEGUARD_STRICT_STACKS=1 makes a missing Python an error instead.

SUPPORTED_PYTHONS="3.10 3.11 3.12 3.13"
STACK_WARNINGS=()

warn() {
    local message="WARNING: $*"
    STACK_WARNINGS+=("$message")
    printf '\n\033[1;33m%s\033[0m\n\n' "$message" >&2
}

python_is() {  # python_is PYTHON X.Y: whether PYTHON runs and is version X.Y
    "$1" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$2'" 2>/dev/null
}

find_exact_python() {  # find_exact_python X.Y: a Python X.Y that runs here, or nothing
    local version=$1 candidate
    # Newest patch release first.
    for candidate in $(ls -d "$HOME"/.pyenv/versions/"$version".*/bin/python3 2>/dev/null | sort -rV) \
            "python$version" "/usr/local/bin/python$version" "/usr/bin/python$version"; do
        if python_is "$candidate" "$version"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

nearest_versions() {  # nearest_versions X.Y: the other supported versions, nearest first
    local want=${1#3.} v
    for v in $SUPPORTED_PYTHONS; do
        v=${v#3.}
        [ "$v" = "$want" ] && continue
        # distance, then prefer the newer Python on a tie
        echo "$(( v > want ? v - want : want - v )) $(( 100 - v )) 3.$v"
    done | sort -n | cut -d' ' -f3
}

find_stack_python() {  # find_stack_python STACK X.Y: sets STACK_PYTHON for STACK
    # (a global, not printed: a WARNING must reach STACK_WARNINGS, not a subshell's copy)
    local stack=$1 version=$2 override found v
    override="PYTHON_$(echo "$stack" | tr '[:lower:]' '[:upper:]')"
    STACK_PYTHON=
    if [ -n "${!override:-}" ]; then
        STACK_PYTHON=${!override}
        return 0
    fi
    if found=$(find_exact_python "$version"); then
        STACK_PYTHON=$found
        return 0
    fi
    if [ "${LIFEGUARD_STRICT_STACKS:-}" = 1 ]; then
        echo "ERROR: Python $version not found for the $stack stack (LIFEGUARD_STRICT_STACKS=1)" >&2
        return 1
    fi
    for v in $(nearest_versions "$version"); do
        if found=$(find_exact_python "$v"); then
            warn "Python $version not found: the $stack stack runs on Python $v" \
                "(install Python $version, e.g. pyenv install $version, or set $override)"
            STACK_PYTHON=$found
            return 0
        fi
    done
    echo "ERROR: no supported Python ($SUPPORTED_PYTHONS) found for the $stack stack" >&2
    return 1
}

make_venv() {  # make_venv DIR PYTHON CONSTRAINTS EXTRA: DIR holds '.[EXTRA]' on PYTHON
    local dir=$1 python=$2 constraints=$3 extra=$4 want
    want=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ -x "$dir/bin/python" ] && ! python_is "$dir/bin/python" "$want"; then
        echo "== $dir was built with another Python: rebuilding it with Python $want"
        rm -rf "$dir"
    fi
    if [ ! -x "$dir/bin/python" ]; then
        "$python" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install -q --disable-pip-version-check \
        -c "$constraints" -e ".[$extra]"
}

describe_venv() {  # describe_venv DIR: what the stack really holds
    "$1/bin/python" - <<'EOF'
import importlib.metadata as md
import platform

def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"

names = ["celery", "django", "sqlalchemy", "psycopg", "psycopg2-binary", "asyncpg", "pgserver"]
print(f"   Python {platform.python_version()}, " + ", ".join(f"{n} {version(n)}" for n in names))
EOF
}

pgserver_bin() {  # pgserver_bin DIR...: pgserver's PostgreSQL binaries in the first venv with them
    local dir
    for dir in "$@"; do
        [ -x "$dir/bin/python" ] || continue
        "$dir/bin/python" - 2>/dev/null <<'EOF' && return 0
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("pgserver")
if spec is None or spec.origin is None:
    sys.exit(1)
bindir = pathlib.Path(spec.origin).parent / "pginstall" / "bin"
if not (bindir / "postgres").exists():
    sys.exit(1)
print(bindir)
EOF
    done
    return 1
}

lend_postgres_binaries() {  # lend_postgres_binaries VENV [OTHER_VENV...]
    # pgserver has no wheel for Python 3.13. When VENV finds no PostgreSQL binaries (no
    # system PostgreSQL, no pgserver), point LIFEGUARD_PG_BIN at another venv's pgserver,
    # else at a pgserver wheel for Python 3.12 unpacked into VENV (its binaries do not
    # depend on Python's version).
    local venv=$1 bindir
    shift
    [ -n "${LIFEGUARD_PG_BIN:-}" ] && return 0
    if "$venv/bin/python" -c 'from lifeguard.demo.postgres import find_binaries; find_binaries()' \
            2>/dev/null; then
        return 0
    fi
    if ! bindir=$(pgserver_bin "$@"); then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
            --only-binary=:all: --python-version 3.12 --target "$venv/pgserver-py312" \
            'pgserver==0.1.4' || return 0
        bindir="$venv/pgserver-py312/pgserver/pginstall/bin"
        [ -x "$bindir/postgres" ] || return 0
    fi
    echo "== no PostgreSQL binaries for $venv: using pgserver's from $bindir"
    export LIFEGUARD_PG_BIN=$bindir
}
