"""Built-in pruning methods of compress-core, registered through the ``pruning`` entry point."""
