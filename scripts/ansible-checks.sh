#!/usr/bin/env bash
# Quality gates of the Ansible collection vims.attestation, run with the controller venv.
#   lint   ansible-lint (production profile), collection build, ansible-doc of every
#          module and filter, ansible-test sanity on the collection's own content
#   units  the collection's unit tests (tests/unit/plugins) under the controller's pytest
# ansible-test needs the collection at .../ansible_collections/vims/attestation, so the
# built tarball is installed into a scratch tree and sanity runs there: that also
# proves the tarball is complete.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CTL="${VIMS_CONTROLLER_VENV:-$ROOT/.venv-ctl}"
export PATH="$CTL/bin:$PATH"
WHAT="${1:-lint}"
log() { printf '[ansible-checks] %s\n' "$*" >&2; }

# Galaxy and ci-files.testing.ansible.com are unreachable: ansible-test's pip
# bootstrap script is replaced by an ensurepip-based stand-in (DESIGN.md).
pip_standin() {
  local src ver
  src="$("$CTL/bin/python" -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')"
  ver="$(grep -Po "(?<=pip=')[0-9.]+" "$src/_internal/python_requirements.py" | head -1)"
  mkdir -p "$HOME/.ansible/test/cache"
  cp "$ROOT/scripts/get_pip_standin.py" "$HOME/.ansible/test/cache/get_pip_${ver//./_}.py"
}

lint() {
  local scratch
  scratch="$(mktemp -d /tmp/vims-collection.XXXXXX)"
  trap 'rm -rf "$scratch"' RETURN
  cd "$ROOT"
  log "ansible-lint (production profile)"
  ansible-lint --offline --profile production -q
  log "ansible-galaxy collection build"
  ansible-galaxy collection build --output-path "$scratch/dist" . >/dev/null
  # From here on the built tarball, not the checkout (ansible.cfg links the checkout).
  export ANSIBLE_COLLECTIONS_PATH="$scratch"
  ansible-galaxy collection install --offline --force -p "$scratch" "$scratch"/dist/*.tar.gz >/dev/null
  log "ansible-doc renders every module and filter"
  local name
  for name in $(ls plugins/modules/*.py | xargs -n1 basename | sed 's/\.py$//'); do
    ansible-doc "vims.attestation.$name" >/dev/null
  done
  for name in $(ls plugins/filter/*.yml | xargs -n1 basename | sed 's/\.yml$//'); do
    ansible-doc -t filter "vims.attestation.$name" >/dev/null
  done
  log "ansible-test sanity"
  pip_standin
  # Only the collection's own content: src/ and tests/ are the Python runtime,
  # held to ruff and mypy instead.
  (cd "$scratch/ansible_collections/vims/attestation" &&
     ansible-test sanity --python 3.12 --local --color no \
       --test validate-modules --test pep8 --test yamllint --test compile --test import \
       --test ansible-doc --test pylint --test runtime-metadata --test shebang \
       --test use-argspec-type-path --test replace-urlopen --test no-get-exception \
       --test action-plugin-docs --test empty-init --test line-endings --test no-smart-quotes \
       plugins/ meta/ roles/ playbooks/ 2>&1 |
     grep -v -e "WARNING: Location" -e "^Downloading" -e "^Collecting" -e "━━" -e "^Processing" \
             -e "^Looking in" -e "^Using cached" -e "^Installing collected" -e "^Successfully" \
             -e "^  Downloading" -e 'locale "C.UTF-8"' -e "^Installing requirements" -e "previous 1 warning")
}

units() {
  cd "$ROOT"
  "$CTL/bin/python" -m pytest -q -p no:cacheprovider --confcutdir=tests/unit/plugins \
    --rootdir=tests/unit/plugins tests/unit/plugins "${@}"
}

case "$WHAT" in
  lint) lint ;;
  units) shift; units "$@" ;;
  *) echo "usage: $0 lint|units [pytest args]" >&2; exit 2 ;;
esac
