"""What the tests share that is not a test: helpers, shared inputs, and what conftest's
fixtures are built from. Tests get engines, references and servers through the fixtures
(``llm``, ``heron_runner``, ``transformers_runner``, ``server``), not by importing what
builds them."""
