#!/usr/bin/env bash
# `make types`: mypy (configured in pyproject.toml) on the whole package, as it installs.
#
# producer/ and consumer/ install as fraudstream.producer and fraudstream.consumer (pyproject's
# package-dir), so the source tree has no `fraudstream` folder mypy could follow. This builds that layout
# from symlinks in a temporary folder, checks it, and prints the findings with the repository's paths.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mypy="${MYPY:-$repo/.venv/bin/mypy}"

tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/fraudstream"
for entry in "$repo"/fraudstream/*; do
    [[ "$(basename "$entry")" == __pycache__ ]] || ln -s "$entry" "$tree/fraudstream/"
done
ln -s "$repo/producer" "$tree/fraudstream/producer"
ln -s "$repo/consumer" "$tree/fraudstream/consumer"
ln -s "$repo/schemas" "$tree/fraudstream/_schemas"
ln -s "$repo/infra" "$tree/fraudstream/_infra"
ln -s "$repo/rules" "$tree/fraudstream/_rules"

cd "$tree"
status=0
"$mypy" --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" -p fraudstream > "$tree/report" || status=$?
# fraudstream/consumer/x.py -> consumer/x.py, and so on: paths an editor can open from the repository.
sed -E -e 's#^fraudstream/(producer|consumer)/#\1/#' \
       -e 's#^fraudstream/_schemas/#schemas/#' -e 's#^fraudstream/_infra/#infra/#' -e 's#^fraudstream/_rules/#rules/#' \
       "$tree/report"
exit "$status"
