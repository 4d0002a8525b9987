"""Models of topics, messages, e-mail subscriptions and the e-mail outbox."""
