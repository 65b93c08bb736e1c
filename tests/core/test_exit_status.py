from dstack.core.exit_status import describe_engine_exit, describe_exit, exit_error, signal_name


def test_signal_statuses_are_named():
    assert signal_name(139) == "SIGSEGV"
    assert signal_name(137) == "SIGKILL"
    assert signal_name(134) == "SIGABRT"
    assert signal_name(3) is None and signal_name(128) is None and signal_name(None) is None
    assert signal_name(255) is None  # exit(255), not a signal


def test_descriptions():
    assert describe_exit(139) == "killed by SIGSEGV (exit status 139)"
    assert describe_exit(3) == "exited with status 3"
    assert describe_engine_exit(139) == "engine crashed: SIGSEGV"
    assert describe_engine_exit(1) == "engine exited with status 1"


def test_exit_error_prefers_crash_words_and_keeps_plain_statuses_short():
    assert exit_error(139, "engine crashed: SIGSEGV") == "engine crashed: SIGSEGV"
    assert exit_error(139, None) == "killed by SIGSEGV (exit status 139)"
    assert exit_error(1, "engine exited with status 1") == "engine exited with status 1"
    assert exit_error(3, "exited with status 3") == "exit status 3"
