#!/usr/bin/env bash
# The README's main job: VIMS rolled out by Ansible on the one-machine lab.
#  1. site.yml: REM-S + gate, A-VM (swtpm, enrollment, profile, baseline, agent), the
#     lab C-VM; every C-VM attested on demand and tried at the gate: allowed.
#  2. A rootkit hooks a system call from the host; attest.yml: denied (the play
#     fails that C-VM and exits non-zero, as a gate in a pipeline would).
#  3. The hook is undone; attest.yml: allowed again. Then the lab is torn down.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${VIMS_CONTROLLER_VENV:-$ROOT/.venv-ctl}/bin:$PATH"
export ANSIBLE_CONFIG="$ROOT/ansible.cfg" ANSIBLE_NOCOLOR="${ANSIBLE_NOCOLOR:-1}"
PLAY=(ansible-playbook -i inventories/lab/hosts.yml)
step() { printf '\n==== %s ====\n' "$*"; }
# Only the verdict table and the failures of a play, not every task.
verdicts() { sed -n -e '/TASK \[Verdicts\]/,/^$/p' -e '/^fatal:/,/^$/p' -e '/PLAY RECAP/,$p' "$1"; }
cleanup() { "${PLAY[@]}" playbooks/lab-down.yml -e lab_down_purge=true >/tmp/vims-lab-down.log 2>&1 || true; }
trap cleanup EXIT
log="$(mktemp -d /tmp/vims-demo.XXXXXX)"
start=$SECONDS

step "1. site.yml: deploy VIMS on the lab and attest the clean C-VM"
"${PLAY[@]}" playbooks/site.yml >"$log/site.log" 2>&1
rc=$?
verdicts "$log/site.log"
(( rc == 0 )) || { echo "demo: site.yml failed (log $log/site.log)" >&2; exit 1; }

step "2. rootkit on the C-VM (kexec_load -> getpid's handler), then attest.yml"
"${PLAY[@]}" playbooks/lab-attack.yml -e lab_attack=hook >"$log/attack.log" 2>&1 ||
  { echo "demo: attack failed (log $log/attack.log)" >&2; exit 1; }
"${PLAY[@]}" playbooks/attest.yml >"$log/attest-attacked.log" 2>&1
rc=$?
verdicts "$log/attest-attacked.log"
(( rc != 0 )) || { echo "demo: the attacked C-VM was NOT denied" >&2; exit 1; }
echo "attest.yml exited $rc: the attacked C-VM is denied"

step "3. hook removed, attest.yml again"
"${PLAY[@]}" playbooks/lab-attack.yml -e lab_attack=undo >"$log/undo.log" 2>&1 ||
  { echo "demo: undo failed (log $log/undo.log)" >&2; exit 1; }
"${PLAY[@]}" playbooks/attest.yml >"$log/attest-clean.log" 2>&1
rc=$?
verdicts "$log/attest-clean.log"
(( rc == 0 )) || { echo "demo: the repaired C-VM was not allowed again" >&2; exit 1; }

step "done in $((SECONDS - start)) s: clean C-VM allowed, attacked C-VM denied, repaired C-VM allowed (logs in $log)"
