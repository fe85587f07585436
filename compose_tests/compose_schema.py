"""Our own JSON Schema (Draft 7) for docker-compose.yml: the part of the Compose Specification it uses.

Written by hand for this project from the Compose file reference
(https://docs.docker.com/reference/compose-file/), not copied from the upstream
compose-spec.json. It describes only the keys docker-compose.yml uses, and strictly:
every mapping rejects keys it does not name (`additionalProperties: false`), so a typo
fails at any level. Top-level `x-` keys (our YAML anchors) may hold anything.

Where the Specification allows several forms we accept the one the file uses (the
mapping form of `environment` and `depends_on`, the short syntax of `ports` and
`volumes`, the list form of `healthcheck.test`). In a few places it is stricter than the
Specification, on purpose:

* `environment` values are strings, numbers or null, not booleans: PyYAML (YAML 1.1)
  reads an unquoted `no`/`off` as false where compose (YAML 1.2) sees the string, so
  boolean-looking values must be quoted.
* `restart`, durations, `ports` and `volumes` are checked against the syntax the
  reference documents, before interpolation: a `${VAR}` in one of them needs the
  pattern widened first.

When docker-compose.yml starts using a key this schema does not know, check it in the
reference and add it here; test_compose.py fails on keys this schema names that the
file no longer uses, so the schema stays the subset the file needs.
"""

from __future__ import annotations

from typing import Any

# A Compose duration: one or more {value}{unit} with unit us, ms, s, m or h (10s, 1m30s, 500ms).
DURATION_PATTERN = r"^(?:[0-9]+(?:\.[0-9]+)?(?:us|ms|s|m|h))+$"
# Service, volume and profile names.
NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"
# Project name: lowercase letters, digits, dashes and underscores, starting with a letter or digit.
PROJECT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
# restart: "no" (quoted: a bare no is a YAML boolean), always, unless-stopped, on-failure[:max-retries].
RESTART_PATTERN = r"^(?:no|always|unless-stopped|on-failure(?::[0-9]+)?)$"
# ports, short syntax: [[HOST_IP:][HOST_PORT]:]CONTAINER_PORT[/PROTOCOL]: CONTAINER_PORT, HOST_PORT:CONTAINER_PORT,
# HOST_IP:HOST_PORT:CONTAINER_PORT or HOST_IP::CONTAINER_PORT; ports may be ranges (IPv4 host IPs only).
_PORT = r"[0-9]{1,5}(?:-[0-9]{1,5})?"
_IPV4 = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}"
PORT_PATTERN = rf"^(?:{_IPV4}:(?:{_PORT})?:|{_PORT}:)?{_PORT}(?:/(?:tcp|udp|sctp))?$"
# volumes, short syntax: SOURCE:TARGET[:ro|rw]; SOURCE is a named volume or a path (/, ./ or ../).
VOLUME_PATTERN = r"^(?:[a-zA-Z0-9][a-zA-Z0-9_.-]*|\.{0,2}/[^:]*):/[^:]*(?::(?:ro|rw))?$"
# Environment variable names, as a shell accepts them.
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

COMPOSE_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "docker-compose.yml of this project (a subset of the Compose Specification)",
    "type": "object",
    "required": ["services"],
    "properties": {
        "name": {"type": "string", "pattern": PROJECT_NAME_PATTERN},
        "services": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": NAME_PATTERN},
            "additionalProperties": {"$ref": "#/definitions/service"},
        },
        "volumes": {
            "type": "object",
            "propertyNames": {"pattern": NAME_PATTERN},
            # Declared with no options (`name:`): a local volume named after the project.
            "additionalProperties": {"type": "null"},
        },
    },
    "patternProperties": {"^x-": {}},
    "additionalProperties": False,
    "definitions": {
        "duration": {"type": "string", "pattern": DURATION_PATTERN},
        "service": {
            "type": "object",
            "anyOf": [{"required": ["image"]}, {"required": ["build"]}],
            "properties": {
                "image": {"type": "string", "minLength": 1},
                "build": {
                    "type": "object",
                    "minProperties": 1,
                    "properties": {
                        "context": {"type": "string", "minLength": 1},
                        "dockerfile": {"type": "string", "minLength": 1},
                    },
                    "additionalProperties": False,
                },
                "init": {"type": "boolean"},
                "profiles": {
                    "type": "array",
                    "minItems": 1,
                    "uniqueItems": True,
                    "items": {"type": "string", "pattern": NAME_PATTERN},
                },
                "restart": {"type": "string", "pattern": RESTART_PATTERN},
                "stop_grace_period": {"$ref": "#/definitions/duration"},
                "command": {
                    "oneOf": [
                        {"type": "string", "minLength": 1},
                        {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    ]
                },
                "environment": {
                    "type": "object",
                    "propertyNames": {"pattern": ENV_NAME_PATTERN},
                    "additionalProperties": {"type": ["string", "number", "null"]},
                },
                "ports": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {"type": "string", "pattern": PORT_PATTERN},
                },
                "volumes": {
                    "type": "array",
                    "uniqueItems": True,
                    "items": {"type": "string", "pattern": VOLUME_PATTERN},
                },
                "healthcheck": {"$ref": "#/definitions/healthcheck"},
                "depends_on": {
                    "type": "object",
                    "propertyNames": {"pattern": NAME_PATTERN},
                    "additionalProperties": {"$ref": "#/definitions/dependency"},
                },
            },
            "additionalProperties": False,
        },
        "healthcheck": {
            "type": "object",
            "required": ["test"],
            "properties": {
                # Exec form: ["CMD", program, args...] or ["CMD-SHELL", "shell command"].
                "test": {
                    "type": "array",
                    "minItems": 2,
                    "items": [{"enum": ["CMD", "CMD-SHELL"]}],
                    "additionalItems": {"type": "string"},
                },
                "interval": {"$ref": "#/definitions/duration"},
                "timeout": {"$ref": "#/definitions/duration"},
                "start_period": {"$ref": "#/definitions/duration"},
                "retries": {"type": "integer", "minimum": 0},
            },
            "additionalProperties": False,
        },
        # One entry of depends_on, long syntax.
        "dependency": {
            "type": "object",
            "required": ["condition"],
            "properties": {
                "condition": {"enum": ["service_started", "service_healthy", "service_completed_successfully"]},
                # false: start anyway when the dependency is not running (e.g. its profile is off).
                "required": {"type": "boolean"},
            },
            "additionalProperties": False,
        },
    },
}


def property_names(schema: Any = COMPOSE_SCHEMA) -> set[str]:
    """Every key named under `properties` anywhere in the schema."""
    names: set[str] = set()
    if isinstance(schema, dict):
        names.update(schema.get("properties", {}))
        for value in schema.values():
            names |= property_names(value)
    elif isinstance(schema, list):
        for item in schema:
            names |= property_names(item)
    return names
