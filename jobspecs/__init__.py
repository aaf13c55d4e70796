"""Job specs: the schema every peftfleet job is described by, and its YAML loader."""

from jobspecs.load import SpecError, dump_spec, load_spec, parse_spec, spec_from_frozen
from jobspecs.schema import JobSpec

__all__ = ["JobSpec", "SpecError", "dump_spec", "load_spec", "parse_spec", "spec_from_frozen"]
