use super::*;
use crate::leanplum::catalog::MessageKind;
use crate::mapping;

fn msg(id: u64, channel: MessageKind, name: &str) -> Message {
    Message {
        id: Id(id),
        channel,
        name: Some(name.into()),
        subject: None,
        campaign_id: None,
        campaign_name: None,
    }
}

fn service(
    files: Catalog,
    spool: Option<Arc<Spool>>,
    api: bool,
) -> (Arc<CatalogService>, SharedMapping) {
    let shared = SharedMapping::default();
    let s = CatalogService::new(files, MappingOptions::default(), spool, api, shared.clone());
    (s, shared)
}

#[test]
fn without_the_api_nothing_waits() {
    let (s, shared) = service(
        Catalog::from_parts(vec![msg(1, MessageKind::Email, "f")], vec![]),
        None,
        false,
    );
    assert!(!s.must_wait(&[Id(9)], &[], "a"));
    assert!(mapping::current(&shared).catalog.message(Id(1)).is_some());
    assert_eq!(s.status().source, "files");
    assert!(s.status().waiting.is_empty());
}

#[tokio::test]
async fn unknown_message_waits_until_leanplum_answers() {
    let (s, shared) = service(Catalog::empty(), None, true);
    let g0 = s.generation();
    assert!(s.must_wait(&[Id(7)], &[], "20261101/export-1"));
    assert!(s.must_wait(&[Id(7)], &[], "20261101/export-2"));
    let st = s.status();
    assert_eq!(st.waiting.len(), 1);
    assert_eq!(
        (st.waiting[0].kind.as_str(), st.waiting[0].id.as_str()),
        ("message", "7")
    );
    assert_eq!(
        st.waiting[0].files,
        vec!["20261101/export-1", "20261101/export-2"]
    );
    assert_eq!(s.next_due_lookup(), Some(Id(7)));

    // An outage: the file keeps waiting, the reason shows, the retry is scheduled later.
    s.lookup_answered(
        Id(7),
        Err(crate::leanplum::api::ApiError::Transport(
            "connection refused".into(),
        )),
    )
    .await;
    assert!(s.must_wait(&[Id(7)], &[], "20261101/export-1"));
    assert!(s.status().waiting[0].reason.contains("connection refused"));
    assert_eq!(
        s.next_due_lookup(),
        None,
        "retried with backoff, not at once"
    );
    assert_eq!(s.generation(), g0);

    // The answer: published, the generation moves, nothing waits any more.
    s.lookup_answered(Id(7), Ok(Some(msg(7, MessageKind::Push, "p"))))
        .await;
    assert!(s.generation() > g0);
    let m = mapping::current(&shared);
    assert_eq!(m.catalog.message(Id(7)).unwrap().channel, MessageKind::Push);
    assert!(s.status().waiting.is_empty());
    // A reader still holding the old catalog is told to look again.
    assert!(s.must_wait(&[Id(7)], &[], "20261101/export-1"));
    assert!(mapping::session_unknown_messages(&Default::default(), &m.catalog).is_empty());
}

#[tokio::test]
async fn a_message_leanplum_does_not_know_maps_as_unknown() {
    let (s, _) = service(Catalog::empty(), None, true);
    assert!(s.must_wait(&[Id(8)], &[], "f"));
    let g = s.generation();
    s.lookup_answered(Id(8), Ok(None)).await;
    assert!(s.generation() > g, "waiting readers must look again");
    assert!(!s.must_wait(&[Id(8)], &[], "f"));
    assert!(s.status().waiting.is_empty());
    assert_eq!(
        s.show(Some(Id(8))).lookup.as_deref(),
        Some("Leanplum says this message does not exist")
    );
}

#[tokio::test]
async fn files_override_the_api_and_the_cache_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 8 << 20).unwrap());
    let files = Catalog::from_parts(vec![msg(2, MessageKind::Email, "from file")], vec![]);
    let (s, shared) = service(files.clone(), Some(spool.clone()), true);
    assert_eq!(s.status().source, "files (API not reached yet)");
    assert!(s.must_wait(&[Id(2), Id(3)], &[], "f"), "3 is unknown");
    s.lookup_answered(Id(3), Ok(Some(msg(3, MessageKind::Push, "api"))))
        .await;
    {
        let mut st = s.lock();
        st.api
            .insert_message(msg(2, MessageKind::Push, "api says push"));
        s.publish(&mut st);
    }
    s.persist();
    let m = mapping::current(&shared);
    assert_eq!(
        m.catalog.message(Id(2)).unwrap().name.as_deref(),
        Some("from file")
    );
    // As `catalog show --json` prints it.
    let json = |id| serde_json::to_value(s.show(Some(Id(id)))).unwrap();
    assert_eq!(json(2)["entries"][0]["source"], "files");
    assert_eq!(json(2)["entries"][0]["kind"], "message");
    assert_eq!(json(3)["entries"][0]["source"], "api");
    drop((s, m));

    // A restart with Leanplum unreachable: the cache maps.
    let (s, shared) = service(files, Some(spool.clone()), true);
    let st = s.status();
    assert_eq!(st.source, "files+cache");
    assert_eq!(st.messages, 2);
    assert!(st.fetched_at.is_some());
    assert_eq!(
        mapping::current(&shared)
            .catalog
            .message(Id(3))
            .unwrap()
            .channel,
        MessageKind::Push
    );
    assert!(
        matches!(&s.show(Some(Id(3))).entries[..], [ShownEntry::Message { source, .. }] if source == "cache")
    );
    // `catalog show` with no agent: the same view.
    let offline = offline_show(Catalog::empty(), Some(&spool), true, None);
    assert_eq!(offline.entries.len(), 2);
}

#[test]
fn a_damaged_cache_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 8 << 20).unwrap());
    spool.meta().store_catalog_cache(b"{not json").unwrap();
    let (s, _) = service(Catalog::empty(), Some(spool), true);
    assert_eq!(s.status().messages, 0);
    assert_eq!(s.status().source, "files (API not reached yet)");
}

#[test]
fn show_renders_entries_and_unknown_ids() {
    let files = Catalog::from_parts(
        vec![Message {
            subject: Some("Hi".into()),
            campaign_id: Some(Id(5)),
            campaign_name: Some("Launch".into()),
            ..msg(1, MessageKind::Email, "Spring")
        }],
        vec![],
    );
    let (s, _) = service(files, None, false);
    let text = render_show(&s.show(Some(Id(1))), Some("1"));
    assert!(
        text.contains(r#"message 1 [files] email "Spring": subject "Hi" campaign 5 "Launch""#),
        "{text}"
    );
    let text = render_show(&s.show(Some(Id(2))), Some("2"));
    assert!(
        text.contains("2: neither a message nor an A/B test in the catalog"),
        "{text}"
    );
    assert_eq!(
        parse_id(Some("x")),
        Err("\"x\" is not a message or A/B test id (an integer)".to_owned())
    );
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_catalog_and_a_good_one_replaces_it() {
    use crate::leanplum::api::{LeanplumApi, test_server::serve_one_answer};
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path(), 8 << 20).unwrap());
    let (s, shared) = service(Catalog::empty(), Some(spool.clone()), true);
    {
        let mut st = s.lock();
        st.api.insert_message(msg(1, MessageKind::Email, "cached"));
        st.api_source = Some(Source::Cache);
        s.publish(&mut st);
    }
    let api = |url: &str| {
        LeanplumApi::new(
            url,
            "app",
            crate::config::Secret::new("k"),
            Duration::from_secs(2),
            &Default::default(),
        )
        .unwrap()
    };
    for (status, body) in [
        (200, "{\"response\": ["),
        (
            200,
            r#"{"response":[{"success":false,"error":{"message":"Quota"}}]}"#,
        ),
        (503, "down"),
    ] {
        let url = serve_one_answer(status, body, Duration::ZERO);
        assert!(refresh::refresh(&s, &api(&url)).await.is_err());
        let m = mapping::current(&shared);
        assert_eq!(
            m.catalog.message(Id(1)).unwrap().name.as_deref(),
            Some("cached")
        );
        assert!(s.status().last_error.is_some());
        assert_eq!(s.status().source, "files+cache");
    }
    // getMessages and getAbTests both answer this (the lists are read by key).
    let url = serve_one_answer(
        200,
        r#"{"response":[{"success":true,"messages":[{"id":"2","messageType":"Push Notification"}],"abTests":[]}]}"#,
        Duration::ZERO,
    );
    assert!(refresh::refresh(&s, &api(&url)).await.is_ok());
    let st = s.status();
    assert_eq!((st.source.as_str(), st.last_error), ("files+api", None));
    let m = mapping::current(&shared);
    assert!(m.catalog.message(Id(2)).is_some());
    // Kept: a message no list names any more may still be in old exports.
    assert!(m.catalog.message(Id(1)).is_some());
    // And cached for the next start.
    let (again, shared) = service(Catalog::empty(), Some(spool), true);
    assert!(mapping::current(&shared).catalog.message(Id(2)).is_some());
    assert_eq!(again.status().source, "files+cache");
}

#[tokio::test]
async fn an_unknown_abtest_waits_for_the_next_refresh() {
    use crate::leanplum::api::{LeanplumApi, test_server::serve_one_answer};
    let (s, shared) = service(Catalog::empty(), None, true);
    assert!(s.must_wait(&[], &[Id(50), Id(60)], "f"));
    assert!(s.lock().refresh_requested, "a refresh is asked for at once");
    let st = s.status();
    assert_eq!(st.waiting.len(), 2);
    assert_eq!(st.waiting[0].kind, "abtest");
    // The refresh lists 50 but not 60.
    let url = serve_one_answer(
        200,
        r#"{"response":[{"success":true,"messages":[],"abTests":[{"id":"50","name":"T","variants":[{"id":"51","name":"A"}]}]}]}"#,
        Duration::ZERO,
    );
    let api = LeanplumApi::new(
        &url,
        "app",
        crate::config::Secret::new("k"),
        Duration::from_secs(2),
        &Default::default(),
    )
    .unwrap();
    refresh::refresh(&s, &api).await.unwrap();
    assert!(mapping::current(&shared).catalog.abtest(Id(50)).is_some());
    assert!(s.status().waiting.is_empty());
    // 60 is not Leanplum's: no more waiting for it.
    assert!(!s.must_wait(&[], &[Id(60)], "f"));
}

#[test]
fn reloaded_files_replace_the_files_layer_and_wake_readers() {
    let (s, shared) = service(
        Catalog::from_parts(vec![msg(1, MessageKind::Email, "old")], vec![]),
        None,
        false,
    );
    s.lock().opts.send_experiment_viewed = false;
    let generation = s.generation();
    let epoch = s.files_epoch();
    s.reload_files(
        Catalog::from_parts(vec![msg(2, MessageKind::Push, "new")], vec![]),
        epoch,
    );
    assert!(s.generation() > generation, "readers waiting look again");
    let m = mapping::current(&shared);
    assert!(m.catalog.message(Id(1)).is_none());
    assert_eq!(m.catalog.message(Id(2)).unwrap().channel, MessageKind::Push);
    assert!(!m.opts.send_experiment_viewed, "mapping options untouched");
    assert!(!s.lock().refresh_requested, "no API refresh forced");

    // The same entries again (a cron job rewriting unchanged content): nothing to publish.
    let generation = s.generation();
    s.reload_files(
        Catalog::from_parts(vec![msg(2, MessageKind::Push, "new")], vec![]),
        epoch,
    );
    assert_eq!(s.generation(), generation);
}

#[test]
fn refused_files_keep_the_last_good_ones_until_good_ones_come() {
    let (s, shared) = service(
        Catalog::from_parts(vec![msg(1, MessageKind::Email, "good")], vec![]),
        None,
        false,
    );
    let epoch = s.files_epoch();
    let generation = s.generation();
    let error = "bad catalog file /c/messages.json: expected a JSON array at line 1".to_owned();
    s.refuse_files(error.clone(), epoch);
    s.refuse_files(error.clone(), epoch);
    assert_eq!(s.generation(), generation, "nothing new to map with");
    let m = mapping::current(&shared);
    assert_eq!(
        m.catalog.message(Id(1)).unwrap().name.as_deref(),
        Some("good")
    );
    assert_eq!(s.status().files_error.as_deref(), Some(error.as_str()));
    let shown = s.show(None);
    assert_eq!(shown.status.files_error.as_deref(), Some(error.as_str()));
    assert!(render_show(&shown, None).contains(&format!(
        "catalog files refused: {error}; the last good catalog is in use"
    )));

    // Good files again, even with the same entries as before: the error goes.
    s.reload_files(
        Catalog::from_parts(vec![msg(1, MessageKind::Email, "good")], vec![]),
        epoch,
    );
    assert_eq!(s.status().files_error, None);
    // A SIGHUP reload also says the files are good.
    s.refuse_files(error.clone(), epoch);
    s.reload(Catalog::empty(), MappingOptions::default());
    assert_eq!(s.status().files_error, None);
}

#[test]
fn a_watcher_read_that_raced_with_a_sighup_is_dropped() {
    let (s, shared) = service(Catalog::empty(), None, false);
    let before = s.files_epoch();
    s.reload(
        Catalog::from_parts(vec![msg(2, MessageKind::Push, "sighup")], vec![]),
        MappingOptions::default(),
    );
    s.reload_files(
        Catalog::from_parts(vec![msg(1, MessageKind::Email, "stale")], vec![]),
        before,
    );
    s.refuse_files("stale error".into(), before);
    let m = mapping::current(&shared);
    assert!(m.catalog.message(Id(2)).is_some() && m.catalog.message(Id(1)).is_none());
    assert_eq!(s.status().files_error, None);
}

/// The watcher task itself, on a real directory: an atomic rename, an in-place rewrite, a
/// broken file and its repair, each taken within the settle time without a signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_reloads_changed_files() {
    use files::{MESSAGES_FILE, load_files};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(MESSAGES_FILE);
    std::fs::write(&path, r#"[{"id": 1, "channel": "email", "name": "one"}]"#).unwrap();
    let loaded = load_files(dir.path()).unwrap();
    let (s, shared) = service(loaded.catalog, None, false);
    let (_tx, rx) = tokio::sync::watch::channel((loaded.dir, loaded.stamp));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(files::watch(
        s.clone(),
        rx,
        Duration::from_millis(300),
        stop.clone(),
    ));
    let name_of = |id: u64| {
        mapping::current(&shared)
            .catalog
            .message(Id(id))
            .and_then(|m| m.name.clone())
    };
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Atomic: a temp file renamed over it.
    let tmp = dir.path().join(".messages.json.tmp");
    std::fs::write(&tmp, r#"[{"id": 2, "channel": "push", "name": "two"}]"#).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    until("the renamed file", || name_of(2).is_some()).await;
    assert_eq!(name_of(1), None);

    // In place, truncated first and written in two parts.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(br#"[{"id": 3, "channel": "email","#).unwrap();
        f.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        f.write_all(br#" "name": "three"}]"#).unwrap();
    }
    until("the rewritten file", || name_of(3).is_some()).await;
    assert_eq!(
        s.status().files_error,
        None,
        "no error left from the partial file"
    );

    // Broken: refused, the last good catalog stays.
    std::fs::write(&path, "<html><body>502 Bad Gateway</body></html>").unwrap();
    until("the error", || s.status().files_error.is_some()).await;
    let error = s.status().files_error.unwrap();
    assert!(
        error.contains("messages.json") && !error.contains("Gateway"),
        "{error}"
    );
    assert_eq!(name_of(3).as_deref(), Some("three"));

    // Repaired.
    std::fs::write(&path, r#"[{"id": 4, "channel": "email", "name": "four"}]"#).unwrap();
    until("the repair", || name_of(4).is_some()).await;
    assert_eq!(s.status().files_error, None);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the watcher stops when told")
        .unwrap();
}

/// A `catalog_dir` missing at start is an empty catalog; the periodic check finds it when it
/// appears (there was nothing for inotify to watch) and its files are loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_dir_created_later_is_found_and_loaded() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("catalog");
    let loaded = files::load_files(&dir).unwrap();
    assert_eq!(loaded.catalog.len_messages(), 0);
    let (s, shared) = service(loaded.catalog, None, false);
    let (_tx, rx) = tokio::sync::watch::channel((loaded.dir, loaded.stamp));
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(files::watch(
        s.clone(),
        rx,
        Duration::from_millis(200),
        stop.clone(),
    ));
    // Give the watcher time for its first look at the missing directory (the outcome does not
    // depend on it: a directory there at the first look is watched at once).
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join(files::MESSAGES_FILE),
        r#"[{"id": 5, "channel": "push", "name": "five"}]"#,
    )
    .unwrap();
    let deadline = Instant::now() + files::POLL_INTERVAL * 5;
    while mapping::current(&shared).catalog.message(Id(5)).is_none() {
        assert!(
            Instant::now() < deadline,
            "the new directory was never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap();
}
