# Sourced by scripts/ab_model.sh and scripts/ab_vae.sh: `names` (main, then each .variants/NAME that
# holds an oasis/ folder), `variant_path NAME`, the PYTHONPATH prefix that puts that variant's
# oasis/ ahead of this checkout's (which still provides oasis_kernels and the benchmarks), and
# `each_variant CMD`, the rounds over them.
names=(main)
for dir in .variants/*/; do
    [ -d "$dir/oasis" ] && names+=("$(basename "$dir")")
done
variant_path() {
    if [ "$1" = main ]; then echo .; else echo ".variants/$1:."; fi
}
# each_variant CMD...: REPEAT rounds (default 1), in each every variant in turn, so a machine's drift
# falls on all alike; CMD runs with name, round and path (variant_path's) set
each_variant() {
    for ((round = 1; round <= ${REPEAT:-1}; round++)); do
        for name in "${names[@]}"; do
            path=$(variant_path "$name")
            echo "== $name, round $round"
            "$@"
        done
    done
}
