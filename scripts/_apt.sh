# Sourced by scripts/services and scripts/browser (which set `log`): installing Debian packages, said first.
#
# apt_install WHY PACKAGE...   prints every package apt-get would install (the dependencies too), their size and
#                              WHY, then installs them; as root, or with sudo when it needs no password.
# Returns 1 when it cannot (not root, no sudo, no apt-get, or IDEMPO_NO_APT=1), and the caller says what to install.
# IDEMPO_NO_APT=1 installs nothing: the tests that need what is missing then skip (or fail, under CI=true).

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

apt_updated=0
apt_install() {
  local why=$1; shift
  if [ "${IDEMPO_NO_APT:-}" = 1 ]; then
    log "not installing $* ($why): IDEMPO_NO_APT=1"
    return 1
  fi
  command -v apt-get >/dev/null || return 1
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update (to install $*)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || return 1
    apt_updated=1
  fi
  local packages sizes
  packages=$(apt-get -s install -y "$@" 2>/dev/null | awk '/^Inst /{print $2}')
  sizes=$(LC_ALL=C apt-get install --assume-no "$@" 2>/dev/null \
    | sed -n -e 's/^Need to get \([^/]*\/\)\{0,1\}\(.*\) of archives\./\2 to download/p' \
        -e 's/^After this operation, \(.*\) of additional disk space will be used\./\1 on disk/p' \
    | paste -sd, - | sed 's/,/, /')
  log "installing $(echo "$packages" | grep -c .) Debian packages with apt-get${sizes:+ ($sizes)}, for $why:"
  echo "$packages" | paste -sd' ' - | fold -s -w 110 | sed 's/^/    /'
  log "(IDEMPO_NO_APT=1 installs nothing: what needs them then skips, or fails under CI=true)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}
