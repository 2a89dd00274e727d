#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (a release build: minutes) and checks it: the files
# and their modes against packaging/deb-contents.txt, the conffiles, that the unit and the
# config are the repository's, that the maintainer scripts enable the unit but never start it,
# that Depends is sane, and that the packaged binary runs. Fails loudly on any mismatch.
#
#   packaging/build-deb.sh                   build and check; prints the package's path
#   packaging/build-deb.sh --install-check   also install, reinstall, remove and purge it on
#                                            THIS machine and check what each step leaves
#                                            (root, and a machine without the agent installed)
#
# cargo-deb is installed first if missing (CARGO_DEB_VERSION, default below: the version whose
# generated maintainer scripts were reviewed; another one may differ, which the checks catch).
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=leanplum-segment-agent
CARGO_DEB_VERSION=${CARGO_DEB_VERSION:-3.8.0}
EXPECTED=packaging/deb-contents.txt

install_check=false
case "${1:-}" in
    "") ;;
    --install-check) install_check=true ;;
    *) echo "usage: $0 [--install-check]" >&2; exit 2 ;;
esac

fail() {
    echo "build-deb: FAIL: $*" >&2
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! cargo deb --version >/dev/null 2>&1; then
    echo "== cargo install cargo-deb --locked --version $CARGO_DEB_VERSION"
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
echo "== $(cargo deb --version)"

echo "== cargo deb -- --locked"
started=$SECONDS
# cargo-deb prints the paths of what it wrote on stdout (the .deb, and the -dbgsym .ddeb).
cargo deb -- --locked | tee "$work/built"
echo "== built in $((SECONDS - started)) s"
deb=$(grep '\.deb$' "$work/built" | tail -n 1)
[ -f "$deb" ] || fail "cargo deb reported no .deb"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)

echo "== dpkg-deb -I $deb"
dpkg-deb -I "$deb"
echo "== dpkg-deb -c $deb"
dpkg-deb -c "$deb"

echo "== checking files and modes against $EXPECTED"
grep -v '^#' "$EXPECTED" | awk 'NF { print $1, $2, $3 }' | sort >"$work/expected-files"
# Fields: mode, owner/group, size, date, time, path ("./etc/..."). Directories are left out:
# dpkg makes those it needs, and the files fix which ones.
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { sub(/^\./, "", $6); print $1, $2, $6 }' | sort >"$work/files"
diff -u "$work/expected-files" "$work/files" || fail "package contents differ from $EXPECTED (- expected, + built)"

echo "== checking conffiles"
dpkg-deb -e "$deb" "$work/control"
awk '$4 == "conffile" { print $3 }' "$EXPECTED" | sort >"$work/expected-conffiles"
sort "$work/control/conffiles" >"$work/conffiles"
diff -u "$work/expected-conffiles" "$work/conffiles" || fail "conffiles differ (- expected, + built)"

echo "== checking control fields"
field() { dpkg-deb -f "$deb" "$1"; }
[ "$(field Package)" = "$NAME" ] || fail "Package is $(field Package)"
[ "$(field Version)" = "$version-1" ] || fail "Version is $(field Version), Cargo.toml says $version"
depends=$(field Depends)
for dep in adduser libc6; do
    grep -Eq "(^|, )$dep( |,|$)" <<<"$depends" || fail "Depends ($depends) lacks $dep"
done

echo "== checking the packaged files are the repository's"
dpkg-deb -x "$deb" "$work/root"
cmp "$work/root/usr/lib/systemd/system/$NAME.service" "systemd/$NAME.service" || fail "packaged unit differs"
cmp "$work/root/usr/lib/systemd/system/$NAME@.service" "systemd/$NAME@.service" || fail "packaged template unit differs"
cmp "$work/root/etc/$NAME/config.toml" packaging/config.toml || fail "packaged config differs"
packaged_version=$("$work/root/usr/bin/$NAME" --version) || fail "the packaged binary does not run"
[ "$packaged_version" = "$NAME $version" ] || fail "packaged binary says '$packaged_version'"

echo "== checking the maintainer scripts"
for script in postinst prerm postrm; do
    path="$work/control/$script"
    [ -x "$path" ] || fail "$script missing or not executable"
    sh -n "$path" || fail "$script: syntax error"
    if grep -q '#DEBHELPER#' "$path"; then
        fail "$script: debhelper token left unreplaced"
    fi
    # The unit is enabled on install but never started by the package (only try-restarted on
    # upgrade, which leaves a stopped service stopped).
    if grep -Eq 'deb-systemd-invoke +(start|restart) ' "$path"; then
        fail "$script starts the unit"
    fi
    if command -v shellcheck >/dev/null 2>&1; then
        shellcheck -s sh "$path" || fail "$script: shellcheck"
    fi
done
grep -q "deb-systemd-helper enable $NAME.service" "$work/control/postinst" || fail "postinst does not enable the unit"
grep -q "deb-systemd-invoke try-restart $NAME.service" "$work/control/postinst" || fail "postinst does not try-restart on upgrade"
grep -q "deb-systemd-invoke stop $NAME.service" "$work/control/prerm" || fail "prerm does not stop the unit"
# The template is installed, never enabled or started by the package (an instance needs its
# own config); cargo-deb's generated code leaves it out, and the scripts handle instances the
# admin started themselves: stopped on remove, try-restarted on upgrade.
if grep -Eq "deb-systemd-(helper|invoke) +[a-z-]+ +([^ ]+ +)*$NAME@" "$work/control/postinst" "$work/control/prerm"; then
    fail "the generated maintainer scripts act on the template $NAME@.service"
fi
grep -q "systemctl stop \"$NAME@\*.service\"" "$work/control/prerm" || fail "prerm does not stop the template's instances"
grep -q "systemctl try-restart \"\$NAME@\*.service\"" "$work/control/postinst" || fail "postinst does not try-restart the template's instances"

if $install_check; then
    echo "== install check on this machine"
    [ "$(id -u)" = 0 ] || fail "--install-check needs root"
    if dpkg-query -W -f '${Status}' "$NAME" 2>/dev/null | grep -q installed; then
        fail "$NAME is installed here already: --install-check is for throwaway machines"
    fi
    [ ! -e "/etc/$NAME" ] || fail "/etc/$NAME exists here already: --install-check is for throwaway machines"
    if [ -d /run/systemd/system ]; then
        echo "   (systemd runs here: dpkg will reload it; the unit must stay inactive)"
    fi
    expect_stat() { # path, "owner:group mode"
        local got
        got=$(stat -c '%U:%G %a' "$1")
        [ "$got" = "$2" ] || fail "$1 is $got, expected $2"
    }
    expect_state() {
        expect_stat "/etc/$NAME" "root:$NAME 750"
        expect_stat "/etc/$NAME/catalog" "root:$NAME 750"
        expect_stat "/etc/$NAME/config.toml" "root:$NAME 640"
        [ -L "/etc/systemd/system/multi-user.target.wants/$NAME.service" ] || fail "unit not enabled"
        [ -f "/usr/lib/systemd/system/$NAME@.service" ] || fail "template unit not installed"
        if ls /etc/systemd/system/*.wants/"$NAME@"* >/dev/null 2>&1; then
            fail "the package enabled an instance of the template"
        fi
        if [ -d /run/systemd/system ] && systemctl is-active --quiet "$NAME.service"; then
            fail "the package started the unit"
        fi
    }

    echo "-- dpkg -i (install)"
    dpkg -i "$deb"
    getent passwd "$NAME" || fail "no user $NAME"
    IFS=: read -r _ _ uid gid _ home shell < <(getent passwd "$NAME")
    [ "$uid" -lt 1000 ] || fail "user $NAME is not a system user (uid $uid)"
    [ "$(getent group "$gid" | cut -d: -f1)" = "$NAME" ] || fail "user $NAME's group is not $NAME"
    [ "$home" = "/var/lib/$NAME" ] || fail "home is $home"
    [ "$shell" = /usr/sbin/nologin ] || fail "shell is $shell"
    expect_state

    echo "-- the service user can check the config; others cannot read it"
    install -m 0600 -o "$NAME" -g "$NAME" /dev/null "/etc/$NAME/write_key"
    echo "install-check-key" >"/etc/$NAME/write_key"
    runuser -u "$NAME" -- "/usr/bin/$NAME" check-config || fail "check-config as $NAME"
    if runuser -u nobody -- cat "/etc/$NAME/config.toml" >/dev/null 2>&1; then
        fail "nobody can read the config"
    fi

    echo "-- dpkg -i again (upgrade path): idempotent, keeps a changed conffile"
    echo "# changed by install-check" >>"/etc/$NAME/config.toml"
    dpkg -i "$deb"
    expect_state
    grep -q 'changed by install-check' "/etc/$NAME/config.toml" || fail "upgrade replaced a changed conffile"

    echo "-- dpkg -r (remove): the config and the user stay, the binary goes"
    mkdir -p "/var/lib/$NAME" && touch "/var/lib/$NAME/spool-stand-in"
    dpkg -r "$NAME"
    [ ! -e "/usr/bin/$NAME" ] || fail "binary left after remove"
    [ -f "/etc/$NAME/config.toml" ] || fail "config removed by remove"
    getent passwd "$NAME" >/dev/null || fail "user removed by remove"

    echo "-- dpkg -P (purge): nothing is left"
    dpkg -P "$NAME"
    for path in "/etc/$NAME" "/var/lib/$NAME"; do
        [ ! -e "$path" ] || fail "$path left after purge"
    done
    if getent passwd "$NAME" >/dev/null || getent group "$NAME" >/dev/null; then
        fail "user or group left after purge"
    fi
    leftovers=$(find /etc/systemd /var/lib/systemd/deb-systemd-helper-enabled \
        /var/lib/systemd/deb-systemd-helper-masked -name "*$NAME*" 2>/dev/null || true)
    [ -z "$leftovers" ] || fail "left after purge: $leftovers"
    echo "   install check passed"
fi

echo "build-deb: OK: $deb"
