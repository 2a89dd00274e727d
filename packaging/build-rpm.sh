#!/usr/bin/env bash
# Builds the RPM from packaging/rpm/leanplum-segment-agent.spec with rpmbuild and checks it:
# files, modes and owners, config files, that the packaged binary runs; prints the scriptlets.
# The source tarball is the working tree as it is (committed or not, without ignored files),
# so the spec is tested on what is being changed.
#
#   packaging/build-rpm.sh
#
# Needs rpmbuild (Debian: apt-get install rpm). On a host that is not RPM-based, two things
# stand in for what a Fedora/RHEL build root has: a small macro file for the systemd and
# directory macros that systemd-rpm-macros would define (with the same scriptlet logic), and
# --nodeps, as Debian's rpm database knows none of the BuildRequires.
#
# cargo builds into this repository's target/ (CARGO_TARGET_DIR), so a release build made
# before (cargo deb, cargo build --release) is mostly reused instead of redone from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=leanplum-segment-agent
SPEC=packaging/rpm/$NAME.spec

fail() {
    echo "build-rpm: FAIL: $*" >&2
    exit 1
}

command -v rpmbuild >/dev/null 2>&1 || fail "rpmbuild not found (Debian: apt-get install rpm)"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
spec_version=$(sed -n 's/^Version: *//p' "$SPEC")
[ "$spec_version" = "$version" ] || fail "$SPEC says Version $spec_version, Cargo.toml $version"

top=$(mktemp -d)
trap 'rm -rf "$top"' EXIT
mkdir -p "$top/SOURCES"

echo "== source tarball from the working tree"
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
        # Tracked files deleted in the working tree are not part of it.
        if [ -e "$f" ]; then printf '%s\0' "$f"; fi
    done |
    tar --null -T - --transform "s,^,$NAME-$version/," -czf "$top/SOURCES/$NAME-$version.tar.gz"

rpm_args=(--define "_topdir $top")
if [ -z "$(rpm --eval '%{?systemd_post:yes}')" ]; then
    echo "== no systemd-rpm-macros here: using stand-ins, and --nodeps"
    cat >"$top/macros.systemd-stand-in" <<'MACROS'
%_unitdir /usr/lib/systemd/system
%_sharedstatedir /var/lib
%_docdir_fmt %%{NAME}
%systemd_requires Requires(post): systemd\
Requires(preun): systemd\
Requires(postun): systemd
%systemd_post() if [ $1 -eq 1 ] && [ -x "/usr/lib/systemd/systemd-update-helper" ]; then\
    /usr/lib/systemd/systemd-update-helper install-system-units %{?*} || :\
fi
%systemd_preun() if [ $1 -eq 0 ] && [ -x "/usr/lib/systemd/systemd-update-helper" ]; then\
    /usr/lib/systemd/systemd-update-helper remove-system-units %{?*} || :\
fi
%systemd_postun_with_restart() if [ $1 -ge 1 ] && [ -x "/usr/lib/systemd/systemd-update-helper" ]; then\
    /usr/lib/systemd/systemd-update-helper mark-restart-system-units %{?*} || :\
fi
MACROS
    rpm_args+=(--load "$top/macros.systemd-stand-in" --nodeps
        # Debian's rpm has no find-debuginfo; Fedora's makes the -debuginfo package.
        --define "debug_package %{nil}")
fi

echo "== rpmbuild -bb $SPEC"
started=$SECONDS
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target} \
    rpmbuild -bb "${rpm_args[@]}" --define "_sourcedir $top/SOURCES" "$SPEC"
echo "== built in $((SECONDS - started)) s"
rpm_file=$(find "$top/RPMS" -name "$NAME-$version-*.rpm" | head -n 1)
[ -n "$rpm_file" ] || fail "rpmbuild made no package"

echo "== rpm -qip"
rpm -qip "$rpm_file"
echo "== files"
# /usr/lib/.build-id links are rpmbuild's own (they point debuginfo at the binary).
rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]' "$rpm_file" >"$top/all-files"
cat "$top/all-files"
grep -v ' /usr/lib/\.build-id' "$top/all-files" >"$top/files"
cat >"$top/expected-files" <<EXPECTED
-rwxr-xr-x root:root /usr/bin/$NAME
-rw-r--r-- root:root /usr/lib/systemd/system/$NAME.service
-rw-r--r-- root:root /usr/lib/systemd/system/$NAME@.service
drwxr-x--- root:$NAME /etc/$NAME
-rw-r----- root:$NAME /etc/$NAME/config.toml
drwxr-x--- root:$NAME /etc/$NAME/catalog
-rw-r--r-- root:root /etc/$NAME/catalog/README.txt
drwxr-xr-x root:root /usr/share/doc/$NAME
-rw-r--r-- root:root /usr/share/doc/$NAME/README.md
drwxr-x--- $NAME:$NAME /var/lib/$NAME
EXPECTED
diff -u <(sort "$top/expected-files") <(sort "$top/files") || fail "package files differ (- expected, + built)"

echo "== config files"
rpm -qcp "$rpm_file" | sort >"$top/config-files"
printf '%s\n' "/etc/$NAME/catalog/README.txt" "/etc/$NAME/config.toml" |
    diff -u - "$top/config-files" || fail "config files differ (- expected, + built)"
# %config(noreplace): an edited config survives an upgrade (the new one lands as .rpmnew).
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm_file" | grep -q "^cn /etc/$NAME/config.toml$" ||
    fail "config.toml is not %config(noreplace)"

echo "== scriptlets"
rpm -qp --scripts "$rpm_file"

echo "== the packaged binary runs"
mkdir "$top/root"
# rpm2archive comes with rpm itself (cpio often does not).
rpm2archive -n - <"$rpm_file" | tar -x -C "$top/root"
packaged_version=$("$top/root/usr/bin/$NAME" --version) || fail "the packaged binary does not run"
[ "$packaged_version" = "$NAME $version" ] || fail "packaged binary says '$packaged_version'"
cmp "$top/root/usr/lib/systemd/system/$NAME.service" "systemd/$NAME.service" || fail "packaged unit differs"
cmp "$top/root/usr/lib/systemd/system/$NAME@.service" "systemd/$NAME@.service" || fail "packaged template unit differs"

mkdir -p target/rpm
cp "$rpm_file" target/rpm/
echo "build-rpm: OK: target/rpm/$(basename "$rpm_file")"
