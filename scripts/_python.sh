# Sourced by the scripts: find a Python >= 3.12 and make the project's .venv with it.
# mitmproxy 12 needs Python 3.12 or newer; on these machines `python3` may be older,
# with newer interpreters installed beside it by pyenv.

find_python() {
    local candidates=("${R4U_PYTHON:-}" python3.13 python3.12 python3)
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    local d
    for d in "$pyenv_root"/versions/3.1[2-9]*/bin/python3; do
        [ -x "$d" ] && candidates+=("$d")
    done
    local c
    for c in "${candidates[@]}"; do
        [ -n "$c" ] || continue
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
            command -v "$c"
            return 0
        fi
    done
    echo "r4u-mitm needs Python >= 3.12 (mitmproxy 12 requires it), and none was found." >&2
    echo "Install one (e.g. 'pyenv install 3.12') or point R4U_PYTHON at it." >&2
    return 1
}

# ensure_venv EXTRAS: create .venv on first use and install the project (editable) into it.
ensure_venv() {
    local extras="$1" root venv stamp want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/.venv"
    if [ ! -x "$venv/bin/python" ]; then
        local py
        py="$(find_python)" || exit 1
        echo "creating $venv with $py" >&2
        "$py" -m venv "$venv" || exit 1
    fi
    stamp="$venv/.r4u-installed-${extras:-base}"
    want="$extras $(cksum < "$root/pyproject.toml")"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing r4u-mitm${extras:+[$extras]} into $venv" >&2
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root${extras:+[$extras]}" || exit 1
        echo "$want" > "$stamp"
    fi
    VENV="$venv"
    ROOT="$root"
}
