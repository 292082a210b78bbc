"""Offline checks of a Ray cluster-launcher config, run before `ray up`.

Two layers. First Ray's own: its JSON schema and the steps `ray up` takes before it calls the
cloud (defaults filled in, then the semantic checks), so typos and dangling node types are caught
on a laptop without credentials. Then this project's rules, each aimed at a mistake that costs
money or exposes the cluster and that Ray does not catch:

- network: no security-group rule open to the whole internet, and every AWS node type names its
  own security group (otherwise Ray creates one that admits SSH from 0.0.0.0/0);
- bind addresses: the dashboard and the MLflow server do not listen on every interface;
- tracking: the MLflow URI the nodes get is a server they can reach, not a file on one node;
- recipes: each recipe's per-worker request fits some node type, and enough of them.

The first failing check raises `UserError` with one line naming the key and the fix.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from lejepa_platform.console import quieter
from lejepa_platform.errors import UserError

PLACEHOLDER = "CHANGE_ME"
"""Marks values a user must fill in before `ray up`; reported, not rejected."""

# Detection strings: what "reachable from anywhere" looks like in rules and bind flags.
OPEN_CIDRS = ("0.0.0.0/0", "::/0")
ANY_INTERFACE = ("0.0.0.0", "::", "[::]", "*")
LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")

_DASHBOARD_HOST = re.compile(r"--dashboard-host(?:=|\s+)(\S+)")
_MLFLOW_SERVER = re.compile(r"\bmlflow\s+(?:server|ui)\b([^;&|()>]*)")
_HOST_FLAG = re.compile(r"(?:--host|(?<!\S)-h)(?:=|\s+)(\S+)")
_TRACKING_ASSIGN = re.compile(r"\bMLFLOW_TRACKING_URI=(\"[^\"]*\"|'[^']*'|[^\s;&|)]+)")


def check_cluster_config(path: str = "cluster.yaml", recipes: list[str] | None = None) -> dict:
    """Validate `path` offline; return a JSON-ready summary or raise `UserError` (one line)."""
    import ray

    raw = _load_yaml(path)
    try:
        config = _validate_with_ray(raw)
        checks = [
            _check_network(config),
            _check_bind_hosts(raw, config),
            _check_tracking_uri(raw, config),
        ]
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    checks.extend(_check_recipe(spec, config) for spec in recipes or [])
    node_types = config["available_node_types"]
    return {
        "ok": True,
        "path": str(path),
        "ray_version": ray.__version__,
        "provider": config["provider"]["type"],
        "head_node_type": config["head_node_type"],
        "max_workers": config["max_workers"],
        "node_types": {
            name: {
                "instance_type": nt["node_config"].get("InstanceType", ""),
                "resources": dict(nt.get("resources", {})),
                "min_workers": nt["min_workers"],
                "max_workers": nt["max_workers"],
            }
            for name, nt in node_types.items()
        },
        "checks": [f"ray schema: valid for Ray {ray.__version__}", *checks],
        "placeholders": [where for where, text in _strings(raw) if PLACEHOLDER in text],
    }


# --------------------------------------------------------------------------------------------
# Loading and Ray's own validation


def _load_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"cluster config {path!r} does not exist (expected a Ray cluster-launcher YAML file)")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of cluster settings at the top level, got {type(data).__name__}")
    return data


def _validate_with_ray(raw: dict) -> dict:
    """Ray's schema on the file as written, then what `ray up` does before any cloud call.

    The raw pass reports problems in the user's own keys; `prepare_config` then merges the
    provider defaults (which is how an omitted start command ends up as Ray's default one), and
    `validate_config` adds Ray's semantic checks (head type exists, min_workers <= max_workers).
    """
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private import util

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(raw, schema)
    except jsonschema.ValidationError as err:
        raise UserError(_schema_message(err)) from None

    try:
        with quieter(util.__name__, logging.WARNING):  # it logs one INFO line per node type it fills in
            config = util.prepare_config(copy.deepcopy(raw))
            util.validate_config(config)
    except jsonschema.ValidationError as err:
        raise UserError(f"after Ray filled in its defaults: {_schema_message(err)}") from None
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as err:
        message = str(err).strip() or type(err).__name__
        if "head_node_type" in message:
            names = ", ".join(sorted(raw.get("available_node_types") or {})) or "none"
            message += f" Got head_node_type = {raw.get('head_node_type')!r}; node types: {names}."
        raise UserError(message) from None
    return config


def _schema_message(err: Any) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "top level"
    message = " ".join(err.message.split())
    if len(message) > 240:
        message = message[:237] + "..."
    if err.validator == "additionalProperties" and isinstance(err.schema, dict):
        allowed = sorted(err.schema.get("properties", {}))
        if allowed:
            message += f"; allowed keys: {', '.join(allowed)}"
    return f"{where}: {message}"


# --------------------------------------------------------------------------------------------
# Project checks on the prepared config


def _check_network(config: dict) -> str:
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", []) if isinstance(r, dict)]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", []) if isinstance(r, dict)]
        for cidr in cidrs:
            if cidr in OPEN_CIDRS:
                raise UserError(
                    f"provider.security_group.IpPermissions[{i}] admits {_ports(rule)} from {cidr}, i.e. "
                    "the whole internet: allow only your admin address (e.g. 203.0.113.7/32) or the "
                    "cluster's own security group")
    if config["provider"]["type"] != "aws":
        return f"network: no rule open to the internet (security-group checks are AWS-only; provider is {config['provider']['type']})"
    for name, node_type in config["available_node_types"].items():
        if not _has_own_security_group(node_type["node_config"]):
            raise UserError(
                f"available_node_types.{name}.node_config sets no SecurityGroupIds: Ray would create a "
                "group that admits SSH from 0.0.0.0/0; create a group that admits only its own members "
                "and your admin address (docs/cluster.md) and list its id")
    return "network: no ingress from the internet; every node type uses its own security group"


def _ports(rule: dict) -> str:
    if str(rule.get("IpProtocol")) == "-1":
        return "all traffic"
    low, high = rule.get("FromPort"), rule.get("ToPort")
    return f"port {low}" if low == high else f"ports {low}-{high}"


def _has_own_security_group(node_config: dict) -> bool:
    if node_config.get("SecurityGroupIds"):
        return True
    interfaces = node_config.get("NetworkInterfaces") or []
    if interfaces and all(isinstance(i, dict) and i.get("Groups") for i in interfaces):
        return True
    return "LaunchTemplate" in node_config  # its groups live in AWS, not in this file


def _check_bind_hosts(raw: dict, config: dict) -> str:
    for where, command in _all_commands(raw, config):
        for host in _DASHBOARD_HOST.findall(command):
            if _unquote(host) in ANY_INTERFACE:
                raise UserError(
                    f"{where} starts the Ray dashboard with --dashboard-host={_unquote(host)}, which "
                    "listens on every interface: use --dashboard-host=127.0.0.1 and reach it through "
                    "port forwarding")
        for args in _MLFLOW_SERVER.findall(command):
            hosts = [_unquote(h) for h in _HOST_FLAG.findall(args)]
            if not hosts:
                raise UserError(
                    f"{where} starts the MLflow server without --host, so it listens on 127.0.0.1 "
                    "only and workers cannot reach it: pass --host <head private address>")
            if hosts[-1] in ANY_INTERFACE:
                raise UserError(
                    f"{where} starts the MLflow server with --host {hosts[-1]}, which listens on every "
                    "interface: bind it to the head's private address instead")
    return "bind addresses: dashboard and MLflow listen on no public interface"


def _check_tracking_uri(raw: dict, config: dict) -> str:
    roles = _commands_by_role(raw, config)
    for role, commands in roles.items():
        uris = [(where, _unquote(value)) for where, command in commands
                for value in _TRACKING_ASSIGN.findall(command)]
        if not uris:
            raise UserError(
                f"the {role} nodes get no MLFLOW_TRACKING_URI, so each would log to a SQLite file of "
                f"its own: export MLFLOW_TRACKING_URI=http://<head private address>:5000 before "
                f"`ray start` in the {role} start commands")
        for where, uri in uris:
            reason = _local_uri_reason(uri)
            if reason:
                raise UserError(
                    f"{where} sets MLFLOW_TRACKING_URI={uri}, {reason} that other nodes cannot reach: "
                    "use the head's server, http://<head private address>:5000")
    return f"tracking: MLFLOW_TRACKING_URI points at a server on {', '.join(roles)} nodes"


def _local_uri_reason(uri: str) -> str | None:
    """Why `uri` only works on the node that wrote it, or None if other nodes can reach it."""
    if uri.startswith("$"):
        return None  # filled in on the node; cannot be judged here
    if "://" not in uri and not uri.startswith(("file:", "sqlite:")):
        return "a local path"
    parts = urlsplit(uri)
    if parts.scheme in ("file", "sqlite"):
        return f"a {parts.scheme} URI"
    host = (parts.hostname or "").lower()
    if host in LOOPBACK_HOSTS or host.startswith("127.") or host in ANY_INTERFACE:
        return "a loopback address"
    return None


def _check_recipe(spec: str, config: dict) -> str:
    from lejepa_platform.config import RunConfig
    from lejepa_platform.recipes import load_recipe

    train = load_recipe(spec, RunConfig).train
    need: dict[str, float] = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        need["GPU"] = 1
    need_text = _resources_text(need)
    plan = _placement(config, need)
    if not plan:
        offered = "; ".join(f"{name} {_resources_text(nt.get('resources', {}))}"
                            for name, nt in config["available_node_types"].items())
        raise UserError(
            f"recipe {spec!r} asks per worker for {need_text}, which no node type offers ({offered}): "
            "lower train.cpus_per_worker or add a node type that has it")
    capacity = sum(per_node * nodes for per_node, nodes in plan.values())
    breakdown = ", ".join(f"{name}: {per_node}/node x {nodes}" for name, (per_node, nodes) in plan.items())
    if train.workers > capacity:
        raise UserError(
            f"recipe {spec!r} asks for train.workers = {train.workers} workers of {need_text}, but the "
            f"cluster fits at most {capacity} ({breakdown}; global max_workers = {config['max_workers']}): "
            "raise max_workers of those node types or lower train.workers")
    return f"recipe {spec}: {train.workers} workers of {need_text} fit (at most {capacity}: {breakdown})"


def _placement(config: dict, need: dict[str, float]) -> dict[str, tuple[int, int]]:
    """{node type: (workers per node, nodes)} at full scale, most workers per node first.

    The head counts once; worker types share the global max_workers budget.
    """
    node_types = config["available_node_types"]
    head = config["head_node_type"]
    per_node = {name: _fits(nt.get("resources", {}), need) for name, nt in node_types.items()}
    plan: dict[str, tuple[int, int]] = {}
    if per_node[head]:
        plan[head] = (per_node[head], 1)
    budget = config["max_workers"]
    for name in sorted((n for n in node_types if n != head and per_node[n]), key=lambda n: -per_node[n]):
        nodes = min(node_types[name]["max_workers"], budget)
        if nodes > 0:
            plan[name] = (per_node[name], nodes)
            budget -= nodes
    return plan


def _fits(offered: dict[str, float], need: dict[str, float]) -> int:
    """How many bundles `need` fit into one node offering `offered`."""
    counts = [math.floor(offered.get(key, 0) / amount + 1e-9) for key, amount in need.items() if amount > 0]
    return max(0, min(counts)) if counts else 0


def _resources_text(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


# --------------------------------------------------------------------------------------------
# Walking the config


def _commands_by_role(raw: dict, config: dict) -> dict[str, list[tuple[str, str]]]:
    """The commands each kind of node runs, as (where, command), the way the launcher picks them.

    `where` names the key in the user's file, or marks Ray's default when the file omits it. A
    node type's own initialization_commands / worker_setup_commands replace the global ones;
    worker types that can never start (max_workers 0) are left out.
    """
    head = config["head_node_type"]
    node_types = config["available_node_types"]
    setup = config.get("setup_commands") or []

    def listed(key: str, commands: list | None = None, owner: str = "") -> list[tuple[str, str]]:
        if commands is None:
            commands = config.get(key) or []
        where = f"available_node_types.{owner}.{key}" if owner else key
        note = "" if owner or key in raw else " (Ray's default)"
        return [(f"{where}[{i}]{note}", str(c)) for i, c in enumerate(commands)]

    def initialization(name: str) -> list[tuple[str, str]]:
        own = node_types[name].get("initialization_commands")
        return listed("initialization_commands", own, name) if own is not None else listed("initialization_commands")

    def setup_for(key: str) -> list[tuple[str, str]]:
        # prepare_config stored setup_commands + key under key; list the two parts separately
        return listed("setup_commands") + listed(key, (config.get(key) or [])[len(setup):])

    roles = {"head": initialization(head) + setup_for("head_setup_commands") + listed("head_start_ray_commands")}
    workers: dict[str, str] = {}
    for name, node_type in node_types.items():
        if name == head or node_type["max_workers"] <= 0:
            continue
        own_setup = node_type.get("worker_setup_commands")
        workers.update(initialization(name))
        workers.update(listed("worker_setup_commands", own_setup, name) if own_setup is not None
                       else setup_for("worker_setup_commands"))
        workers.update(listed("worker_start_ray_commands"))
    if workers:
        roles["worker"] = list(workers.items())
    return roles


def _all_commands(raw: dict, config: dict) -> Iterator[tuple[str, str]]:
    seen = set()
    for commands in _commands_by_role(raw, config).values():
        for where, command in commands:
            if where not in seen:
                seen.add(where)
                yield where, command


def _strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a nested config with its dotted location."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _strings(sub, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _strings(sub, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def _unquote(text: str) -> str:
    return text.strip("'\"")
