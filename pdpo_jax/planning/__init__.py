"""Planning a run for a TPU slice ahead of time: the programs a run executes, compiled for the
slice's chips without a TPU, with what each needs per chip and the least time it can take.

    slices     TPU slice names -> topology and chip peaks; compile-only devices from libtpu
    programs   the stages' jitted programs with abstract, sharded inputs of a config's shapes
    compile    one program compiled for the slice: memory, FLOPs, bytes
    roofline   the arithmetic: per-chip totals, lower-bound times, steps per epoch
    epochs     how many examples an epoch of each stage covers
    report     the whole plan of a config, as text and as JSON
"""
