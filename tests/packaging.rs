//! Packaging checks that are fast enough for every `cargo test`: the systemd unit and the
//! template unit (one instance per app) pass `systemd-analyze verify` and carry SPEC section
//! 10's settings, and the template is the unit with the instance's paths; the example config
//! (`packaging/config.toml`) passes `check-config`; the unit, the example config and the
//! packages agree on paths; and `[package.metadata.deb]`, the list of what the .deb installs
//! (`packaging/deb-contents.txt`) and the RPM spec's `%files` name the same files.
//!
//! Building the packages takes a release build (minutes), so that is left to
//! `packaging/build-deb.sh` and `packaging/build-rpm.sh`, which check the built packages against
//! the same list. Nothing here boots systemd or talks to the system's service manager.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NAME: &str = "leanplum-segment-agent";
const BIN: &str = env!("CARGO_BIN_EXE_leanplum-segment-agent");
const UNIT: &str = "systemd/leanplum-segment-agent.service";
/// `leanplum-segment-agent@APP.service`: reads `/etc/leanplum-segment-agent/APP.toml`.
const TEMPLATE: &str = "systemd/leanplum-segment-agent@.service";
const EXAMPLE_CONFIG: &str = "packaging/config.toml";
const DEB_CONTENTS: &str = "packaging/deb-contents.txt";
const RPM_SPEC: &str = "packaging/rpm/leanplum-segment-agent.spec";
const INSTALLED_BIN: &str = "/usr/bin/leanplum-segment-agent";
const INSTALLED_CONFIG: &str = "/etc/leanplum-segment-agent/config.toml";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A unit file as systemd reads it: `[Section]` headers, `Key=Value` lines, `#`/`;` comments,
/// backslash continuations. Entries keep their order (ExecReload= runs in order).
struct Unit {
    /// The file, for messages.
    name: &'static str,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn parse(name: &'static str, text: &str) -> Unit {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(continued) = line.strip_suffix('\\') {
                pending.push_str(continued);
                pending.push(' ');
                continue;
            }
            let line = std::mem::take(&mut pending) + line;
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
            } else if let Some((key, value)) = line.split_once('=') {
                entries.push((
                    section.clone(),
                    key.trim().to_owned(),
                    value.trim().to_owned(),
                ));
            } else {
                panic!("{name}: not a section, a setting or a comment: {raw:?}");
            }
        }
        Unit { name, entries }
    }

    fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The one value of a setting that must be set exactly once.
    fn one(&self, section: &str, key: &str) -> &str {
        let name = self.name;
        match self.values(section, key).as_slice() {
            [v] => v,
            [] => panic!("{name}: [{section}] {key}= is missing"),
            more => panic!("{name}: [{section}] {key}= is set {} times", more.len()),
        }
    }

    fn assert_true(&self, section: &str, key: &str) {
        let v = self.one(section, key);
        assert!(
            matches!(v, "yes" | "true" | "on" | "1"),
            "{}: [{section}] {key}={v}, expected yes",
            self.name
        );
    }
}

fn unit() -> Unit {
    Unit::parse(UNIT, &read(UNIT))
}

fn template() -> Unit {
    Unit::parse(TEMPLATE, &read(TEMPLATE))
}

/// The command of an Exec*= value without its special-executable prefixes (`-`, `@`, `:`, `+`,
/// `!`), and the prefixes.
fn split_exec(value: &str) -> (&str, &str) {
    let command = value.trim_start_matches(['-', '@', ':', '+', '!']);
    (&value[..value.len() - command.len()], command)
}

fn check_config_command(config: &str) -> String {
    format!("{INSTALLED_BIN} check-config --config {config}")
}

#[test]
fn unit_has_the_required_settings() {
    required_settings(&unit(), INSTALLED_CONFIG, NAME);
}

/// The template has the plain unit's settings, with the instance's config file and its own
/// state and runtime directories.
#[test]
fn template_has_the_required_settings() {
    required_settings(
        &template(),
        "/etc/leanplum-segment-agent/%i.toml",
        "leanplum-segment-agent/%i",
    );
}

/// `unit` runs `run --config {config}` with `StateDirectory=` and `RuntimeDirectory=` `dirs`.
fn required_settings(unit: &Unit, config: &str, dirs: &str) {
    let service = "Service";
    let name = unit.name;

    // The daemon sends READY=1 once the spool is open and the first scan is done.
    assert_eq!(unit.one(service, "Type"), "notify");
    // A dedicated user, not root and not DynamicUser: the spool must keep one owner across
    // restarts and upgrades, and the packages create this user.
    assert_eq!(unit.one(service, "User"), NAME);
    assert_eq!(unit.one(service, "Group"), NAME);
    for key in ["StateDirectory", "RuntimeDirectory"] {
        assert_eq!(unit.one(service, key), dirs, "{name}: {key}=");
    }
    assert_eq!(
        unit.one(service, "ConfigurationDirectory"),
        NAME,
        "{name}: ConfigurationDirectory="
    );

    assert_eq!(
        split_exec(unit.one(service, "ExecStart")).1,
        format!("{INSTALLED_BIN} run --config {config}"),
        "{name}: ExecStart="
    );
    let (prefix, command) = split_exec(unit.one(service, "ExecStartPre"));
    assert_eq!(
        command,
        check_config_command(config),
        "{name}: ExecStartPre="
    );
    // RestartPreventExitStatus= looks at the main process only: a failing ExecStartPre would
    // make Restart=on-failure retry a bad config forever. `run` exits 78 on its own.
    assert!(
        prefix.contains('-'),
        "{name}: ExecStartPre= needs the '-' prefix, see the comment in {UNIT}"
    );
    // Reload: check first (a failing check aborts the reload), then SIGHUP.
    let reload: Vec<&str> = unit
        .values(service, "ExecReload")
        .into_iter()
        .map(|v| split_exec(v).1)
        .collect();
    assert_eq!(
        reload,
        [
            check_config_command(config).as_str(),
            "/bin/kill -HUP $MAINPID"
        ],
        "{name}: ExecReload="
    );

    assert_eq!(unit.one(service, "Restart"), "on-failure");
    let prevent = unit.one(service, "RestartPreventExitStatus");
    assert!(
        prevent.split_whitespace().any(|s| s == "78"),
        "{name}: RestartPreventExitStatus={prevent} lacks 78 (EX_CONFIG)"
    );

    assert_eq!(unit.one(service, "ProtectSystem"), "strict");
    unit.assert_true(service, "ProtectHome");
    unit.assert_true(service, "NoNewPrivileges");
    unit.assert_true(service, "PrivateTmp");
    let umask = unit.one(service, "UMask");
    assert_eq!(
        u32::from_str_radix(umask, 8).ok(),
        Some(0o077),
        "{name}: UMask={umask}"
    );

    assert!(
        unit.values("Install", "WantedBy")
            .iter()
            .any(|v| v.split_whitespace().any(|t| t == "multi-user.target")),
        "{name}: [Install] WantedBy=multi-user.target is missing"
    );
}

/// The template is the plain unit, setting for setting, in the same order, but for the
/// description, the config file and the state and runtime directories: a hardening or timeout
/// change to one must be made to the other.
#[test]
fn template_is_the_unit_with_the_instance_paths() {
    let instance = |value: &str| {
        value
            .replace(INSTALLED_CONFIG, "/etc/leanplum-segment-agent/%i.toml")
            .replace(
                "Description=Leanplum engagement exports to Segment",
                "Description=Leanplum engagement exports to Segment (%i)",
            )
    };
    let expected: Vec<String> = unit()
        .entries
        .iter()
        .map(|(section, key, value)| {
            let value = match key.as_str() {
                "StateDirectory" | "RuntimeDirectory" => format!("{value}/%i"),
                _ => value.clone(),
            };
            instance(&format!("[{section}] {key}={value}"))
        })
        .collect();
    let got: Vec<String> = template()
        .entries
        .iter()
        .map(|(section, key, value)| format!("[{section}] {key}={value}"))
        .collect();
    assert_eq!(got, expected, "{TEMPLATE} vs {UNIT}");

    // The paths an instance's config must set (README, "Two apps on one host"), as the
    // template makes them for an instance named app1.
    let unit = template();
    let spool = format!("/var/lib/{}", unit.one("Service", "StateDirectory"));
    let socket = format!(
        "/run/{}/control.sock",
        unit.one("Service", "RuntimeDirectory")
    );
    let readme = read("README.md");
    for (key, path) in [("dir", spool), ("socket", socket)] {
        let line = format!("{key} = \"{}\"", path.replace("%i", "app1"));
        assert!(
            readme.contains(&line),
            "README.md does not show an instance config with `{line}`"
        );
    }
    assert!(
        readme.contains("systemctl enable --now leanplum-segment-agent@app1"),
        "README.md does not show how to start an instance"
    );
}

/// The paths the example config uses are the directories the unit makes and lets the service
/// write: a mismatch gives a daemon that cannot open its spool or socket under the sandbox.
#[test]
fn unit_and_example_config_agree_on_paths() {
    let unit = unit();
    let config: toml::Table = read(EXAMPLE_CONFIG)
        .parse()
        .unwrap_or_else(|e| panic!("{EXAMPLE_CONFIG}: {e}"));
    let get = |section: &str, key: &str| -> String {
        config
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("{EXAMPLE_CONFIG}: {section}.{key} missing"))
            .to_owned()
    };
    let state = format!("/var/lib/{}", unit.one("Service", "StateDirectory"));
    let runtime = format!("/run/{}/", unit.one("Service", "RuntimeDirectory"));
    let etc = format!("/etc/{}/", unit.one("Service", "ConfigurationDirectory"));

    assert_eq!(get("spool", "dir"), state, "spool.dir vs StateDirectory=");
    assert!(
        get("control", "socket").starts_with(&runtime),
        "control.socket is outside RuntimeDirectory= {runtime}"
    );
    assert!(
        get("mapping", "catalog_dir").starts_with(&etc),
        "mapping.catalog_dir is outside ConfigurationDirectory= {etc}"
    );
    assert!(
        get("segment", "write_key_file").starts_with(&etc),
        "segment.write_key_file is outside ConfigurationDirectory= {etc}"
    );
    assert!(
        INSTALLED_CONFIG.starts_with(&etc),
        "{INSTALLED_CONFIG} is outside {etc}"
    );
    // after_ingest = "delete" / "move" writes the watch directory; ProtectSystem=strict makes
    // everything else read-only.
    let watch_dir = get("watch", "dir");
    assert!(
        unit.values("Service", "ReadWritePaths")
            .iter()
            .flat_map(|v| v.split_whitespace())
            .any(|p| p.trim_start_matches(['-', '+']) == watch_dir),
        "watch.dir {watch_dir} is not in ReadWritePaths="
    );
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    systemd_analyze_verify(UNIT, None);
}

/// The template, as an instance: verify loads `leanplum-segment-agent@app1.service` from a
/// symlink of that name to the template file, `%i` expanded.
#[test]
fn template_passes_systemd_analyze_verify() {
    systemd_analyze_verify(TEMPLATE, Some("app1"));
}

/// `systemd-analyze verify` on a copy of `rel` (for a template, on `instance` of it).
fn systemd_analyze_verify(rel: &str, instance: Option<&str>) {
    // verify checks that every Exec*= binary exists and is executable: point them at the
    // binary this test run built.
    assert!(
        !BIN.contains(char::is_whitespace),
        "the built binary's path {BIN:?} has whitespace, which the rewritten unit cannot hold"
    );
    let dir = tempfile::tempdir().unwrap();
    let file_name = Path::new(rel).file_name().unwrap();
    let copy = dir.path().join(file_name);
    let text = read(rel);
    assert!(
        text.contains(INSTALLED_BIN),
        "{rel} never runs {INSTALLED_BIN}"
    );
    std::fs::write(&copy, text.replace(INSTALLED_BIN, BIN)).unwrap();
    let target = match instance {
        Some(instance) => {
            let link = dir.path().join(format!("{NAME}@{instance}.service"));
            std::os::unix::fs::symlink(file_name, &link).unwrap();
            link
        }
        None => copy,
    };

    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&target)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run systemd-analyze ({e}): it checks the unit; install it \
             (Debian: apt-get install systemd)"
        ),
    };
    // Warnings about the unit name the unit (its path, or its name in "<name>.service: ...").
    // Lines that do not are about the machine: units it pulls in through After=/WantedBy=
    // that are broken or missing here, or no systemd running as PID 1. Those are shown and
    // skipped; a failure to load the unit itself still fails the exit status below.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (about_unit, about_machine): (Vec<&str>, Vec<&str>) = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .partition(|l| l.contains(NAME));
    for line in &about_machine {
        eprintln!("systemd-analyze (about this machine, ignored): {line}");
    }
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {}",
        describe(&out)
    );
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify warns about {rel}:\n{}",
        about_unit.join("\n")
    );
}

#[test]
fn example_config_is_valid() {
    // The example names /etc/leanplum-segment-agent/write_key, which a test machine does not
    // have: point it at a key file of our own, private as the README says it must be.
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("write_key");
    let key = "packaging-test-write-key-never-printed";
    let mut key_file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .unwrap();
    writeln!(key_file, "{key}").unwrap();
    drop(key_file);

    let text = read(EXAMPLE_CONFIG);
    let shipped = "write_key_file = \"/etc/leanplum-segment-agent/write_key\"";
    assert_eq!(
        text.matches(shipped).count(),
        1,
        "{EXAMPLE_CONFIG} no longer has the line `{shipped}` this test rewrites"
    );
    let config = dir.path().join("config.toml");
    let rewritten = format!("write_key_file = {:?}", key_path.to_str().unwrap());
    std::fs::write(&config, text.replace(shipped, &rewritten)).unwrap();

    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        // Only the key file may supply the key, and the default log level applies.
        .env_remove("SEGMENT_WRITE_KEY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-config rejects {EXAMPLE_CONFIG}: {}",
        describe(&out)
    );
    let all = describe(&out);
    assert!(!all.contains(key), "check-config printed the write key");
    assert!(
        !all.contains("WARN"),
        "check-config warns about {EXAMPLE_CONFIG}: {all}"
    );
}

/// One line of `packaging/deb-contents.txt`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Packaged {
    path: String,
    perms: String,
    owner: String,
    conffile: bool,
}

fn deb_contents() -> Vec<Packaged> {
    read(DEB_CONTENTS)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            match fields.as_slice() {
                [perms, owner, path, rest @ ..] if rest.is_empty() || rest == ["conffile"] => {
                    Packaged {
                        path: (*path).to_owned(),
                        perms: (*perms).to_owned(),
                        owner: (*owner).to_owned(),
                        conffile: !rest.is_empty(),
                    }
                }
                _ => panic!("{DEB_CONTENTS}: bad line {l:?}"),
            }
        })
        .collect()
}

/// `ls -l` style permissions of a regular file with this octal mode ("640" -> "-rw-r-----").
fn perms(octal: &str) -> String {
    let mode = u32::from_str_radix(octal, 8).unwrap_or_else(|_| panic!("bad mode {octal:?}"));
    let mut s = String::from("-");
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn deb_metadata() -> toml::Table {
    let cargo: toml::Table = read("Cargo.toml").parse().unwrap();
    cargo
        .get("package")
        .and_then(|p| p.get("metadata"))
        .and_then(|m| m.get("deb"))
        .and_then(|d| d.as_table())
        .cloned()
        .expect("Cargo.toml has no [package.metadata.deb]")
}

/// What cargo-deb installs for `[package.metadata.deb]`, as `packaging/deb-contents.txt` lines:
/// the assets, the unit from `systemd-units`, and the copyright file it writes itself.
#[test]
fn deb_metadata_matches_the_contents_list() {
    let deb = deb_metadata();
    let mut built = Vec::new();
    for asset in deb["assets"].as_array().expect("assets") {
        let fields: Vec<&str> = asset
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_str()).collect())
            .unwrap_or_else(|| panic!("asset {asset} is not [source, dest, mode]"));
        let [source, dest, mode] = fields.as_slice() else {
            panic!("asset {asset} is not [source, dest, mode]");
        };
        if !source.starts_with("target/") {
            assert!(
                repo(source).is_file(),
                "asset source {source} does not exist"
            );
        }
        let mut path = format!("/{dest}");
        if path.ends_with('/') {
            path.push_str(source.rsplit('/').next().unwrap());
        }
        built.push(Packaged {
            conffile: path.starts_with("/etc/"),
            path,
            perms: perms(mode),
            owner: "0/0".into(),
        });
    }

    let units = deb["systemd-units"].as_table().expect("systemd-units");
    // Enabled on install, never started by the package: the agent needs a write key and a
    // watch directory first.
    assert_eq!(
        units["enable"].as_bool(),
        Some(true),
        "systemd-units.enable"
    );
    assert_eq!(units["start"].as_bool(), Some(false), "systemd-units.start");
    let unit_dir = units["unit-scripts"].as_str().expect("unit-scripts");
    assert!(
        repo(unit_dir).join(format!("{NAME}.service")).is_file(),
        "systemd-units.unit-scripts {unit_dir} does not hold {NAME}.service"
    );
    // cargo-deb installs `<package>.service` and the template `<package>@.service` it finds
    // there, and leaves the template out of the generated enable / start / stop code.
    for unit in [format!("{NAME}.service"), format!("{NAME}@.service")] {
        assert!(
            repo(unit_dir).join(&unit).is_file(),
            "systemd-units.unit-scripts {unit_dir} does not hold {unit}"
        );
        built.push(Packaged {
            path: format!("/usr/lib/systemd/system/{unit}"),
            perms: perms("644"),
            owner: "0/0".into(),
            conffile: false,
        });
    }
    built.push(Packaged {
        path: format!("/usr/share/doc/{NAME}/copyright"),
        perms: perms("644"),
        owner: "0/0".into(),
        conffile: false,
    });

    let mut listed = deb_contents();
    built.sort();
    listed.sort();
    assert_eq!(
        built, listed,
        "Cargo.toml [package.metadata.deb] and {DEB_CONTENTS} disagree"
    );
    assert_eq!(
        deb["maintainer-scripts"].as_str(),
        Some("packaging/debian/"),
        "maintainer-scripts"
    );
}

#[test]
fn maintainer_scripts_are_sound() {
    let token = concat!("#", "DEBHELPER", "#");
    for name in ["postinst", "prerm", "postrm"] {
        let rel = format!("packaging/debian/{name}");
        let path = repo(&rel);
        let text = read(&rel);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{rel} is not executable");
        assert!(
            text.starts_with("#!/bin/sh\n"),
            "{rel}: not a /bin/sh script"
        );
        assert!(text.contains("\nset -e\n"), "{rel}: no `set -e`");
        // cargo-deb puts its systemd code where the token is, and fails the build without it;
        // a second token would run that code twice.
        assert_eq!(
            text.matches(token).count(),
            1,
            "{rel}: the debhelper token must appear exactly once (also not in comments)"
        );
        let out = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "sh -n {rel}: {}", describe(&out));
        // Commands only: the postinst's message to the operator does say `systemctl start`.
        for line in text.lines().map(str::trim_start) {
            for start in [
                "systemctl start",
                "systemctl restart",
                "deb-systemd-invoke start",
            ] {
                assert!(!line.starts_with(start), "{rel} starts the unit: {line}");
            }
        }
    }
    let postinst = read("packaging/debian/postinst");
    assert!(
        postinst.contains("adduser --system"),
        "postinst makes no system user"
    );
    let postrm = read("packaging/debian/postrm");
    assert!(postrm.contains("purge"), "postrm does nothing on purge");
}

/// Expands the few RPM macros the spec uses, as Fedora and RHEL define them.
fn expand(s: &str) -> String {
    s.replace("%{_bindir}", "/usr/bin")
        .replace("%{_unitdir}", "/usr/lib/systemd/system")
        .replace("%{_sysconfdir}", "/etc")
        .replace("%{_sharedstatedir}", "/var/lib")
        .replace("%{name}", NAME)
}

/// The paths the spec's `%files` packages (not its directories), with its macros expanded.
fn rpm_files(spec: &str) -> BTreeSet<String> {
    let files = spec
        .split("\n%files\n")
        .nth(1)
        .expect("the spec has no %files section");
    let files = files.split("\n%changelog").next().unwrap();
    let mut paths = BTreeSet::new();
    for line in files.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let path = words.pop().unwrap();
        if words.contains(&"%dir") {
            continue;
        }
        if words.contains(&"%doc") {
            paths.insert(format!("/usr/share/doc/{NAME}/{path}"));
        } else {
            paths.insert(expand(path));
        }
    }
    paths
}

#[test]
fn rpm_spec_installs_what_the_deb_does() {
    let spec = read(RPM_SPEC);
    let cargo: toml::Table = read("Cargo.toml").parse().unwrap();
    let version = cargo["package"]["version"].as_str().unwrap();
    assert!(
        spec.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Version:", version]),
        "{RPM_SPEC}: Version is not Cargo.toml's {version}"
    );
    let rust_version = cargo["package"]["rust-version"].as_str().unwrap();
    for tool in ["cargo", "rust"] {
        let wanted = format!("BuildRequires:  {tool} >= {rust_version}");
        assert!(
            spec.lines().any(|l| l == wanted),
            "{RPM_SPEC}: no `{wanted}` (Cargo.toml's rust-version)"
        );
    }

    // Debian's copyright file has no RPM counterpart (the License: tag carries it).
    let deb: BTreeSet<String> = deb_contents()
        .into_iter()
        .map(|p| p.path)
        .filter(|p| !p.ends_with("/copyright"))
        .collect();
    assert_eq!(rpm_files(&spec), deb, "{RPM_SPEC} %files vs {DEB_CONTENTS}");

    // An edited config survives upgrades, and is as private as in the .deb.
    assert!(
        spec.lines().any(
            |l| l.starts_with("%config(noreplace) %attr(0640,root,%{name})")
                && l.ends_with("/config.toml")
        ),
        "{RPM_SPEC}: config.toml is not %config(noreplace) with mode 0640"
    );
    for scriptlet in [
        "%systemd_post %{name}.service",
        "%systemd_preun %{name}.service",
        "%systemd_postun_with_restart %{name}.service",
    ] {
        assert!(spec.contains(scriptlet), "{RPM_SPEC}: no `{scriptlet}`");
    }
    // %install copies files of the repository: they must exist.
    for line in spec.lines().filter(|l| l.starts_with("install -D")) {
        let source = expand(line.split_whitespace().nth(2).unwrap());
        if !source.contains("release/") {
            assert!(
                repo(&source).is_file(),
                "{RPM_SPEC}: %install source {source} missing"
            );
        }
    }
}
