"""The embedded demo, apart from the product: sample data, sample surfaces and the tiny base model."""
