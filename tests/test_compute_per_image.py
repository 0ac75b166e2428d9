

def test_the_upgrade_fills_the_declared_counterpart_into_older_records():
    import methods
    from experiments.records import upgrade

    old = {**minimal_record(), "method": "ats", "method_params": {}, "method_info": {"family": "pruning"}}
    new = upgrade.upgraded(old, methods.resolved_params, methods.registered_info)
    assert new["method_info"] == {"counterpart": "evit", "family": "pruning"}
    plain = upgrade.upgraded({**old, "method": "evit"}, methods.resolved_params, methods.registered_info)
    assert plain["method_info"] == {"family": "pruning"}  # a fixed-count method declares none
    legacy = upgrade.upgraded(old, methods.resolved_params, lambda m: methods.method_spec(m).family)
    assert legacy["method_info"] == {"family": "pruning"}  # a family callable still works
