"""Real brokers the test suite installs, starts and stops itself (see tests/conftest.py)."""

from tests.brokers.artemis import Artemis
from tests.brokers.common import Broker, BrokerError
from tests.brokers.rabbitmq import RabbitMQ

__all__ = ["Artemis", "Broker", "BrokerError", "RabbitMQ"]
