# Sourced by scripts/ab_model.sh and scripts/ab_vae.sh: `names` (main, then each .variants/NAME that
# holds an oasis/ folder) and `variant_path NAME`, the PYTHONPATH prefix that puts that variant's
# oasis/ ahead of this checkout's (which still provides oasis_kernels and the benchmarks).
names=(main)
for dir in .variants/*/; do
    [ -d "$dir/oasis" ] && names+=("$(basename "$dir")")
done
variant_path() {
    if [ "$1" = main ]; then echo .; else echo ".variants/$1:."; fi
}
