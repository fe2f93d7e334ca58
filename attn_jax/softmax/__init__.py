"""Softmax attention: public function, reference oracle and backends."""
