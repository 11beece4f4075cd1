"""Typed proxy configuration, validated once at start-up.

A YAML file gives the base; command-line flags override it. Unknown keys are rejected with a
message that names them, so a typo never silently falls back to a default. sections.py holds
one model per concern, model.py the whole (ProxyConfig) and its loading (load_config).
"""

from proxy.config.model import ProxyConfig, load_config
from proxy.config.sections import (
    ENGINE_GET_ZCOPY_ENV,
    AdmissionConfig,
    AuthConfig,
    ConfigError,
    DisaggConfig,
    FailoverConfig,
    FanoutConfig,
    HealthConfig,
    KvHealthConfig,
    PolicyName,
    PoolMode,
    PoolPlannerConfig,
    RoutingConfig,
    StatsConfig,
    TimeoutsConfig,
    WorkerConfig,
    check_worker_url,
)

__all__ = [
    "ENGINE_GET_ZCOPY_ENV",
    "AdmissionConfig",
    "AuthConfig",
    "ConfigError",
    "DisaggConfig",
    "FailoverConfig",
    "FanoutConfig",
    "HealthConfig",
    "KvHealthConfig",
    "PolicyName",
    "PoolMode",
    "PoolPlannerConfig",
    "ProxyConfig",
    "RoutingConfig",
    "StatsConfig",
    "TimeoutsConfig",
    "WorkerConfig",
    "check_worker_url",
    "load_config",
]
