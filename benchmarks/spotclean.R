# Run SpotClean on one exported sample; called by benchmarks/spotclean.py, which writes the inputs.
#
# Usage: Rscript spotclean.R R_LIBRARY IN_DIR OUT_DIR
#   IN_DIR: counts.mtx (genes x spots), genes.txt, barcodes.txt, slide.csv (barcode, tissue, row, col,
#           imagerow, imagecol), keep.txt (the genes to decontaminate).
#   OUT_DIR: decont.mtx (genes x tissue spots), decont_genes.txt, decont_barcodes.txt, meta.json.

args <- commandArgs(trailingOnly = TRUE)
.libPaths(c(args[[1]], .libPaths()))
in_dir <- args[[2]]
out_dir <- args[[3]]

suppressPackageStartupMessages({
    library(Matrix)
    library(SpotClean)
})

counts <- as(readMM(file.path(in_dir, "counts.mtx")), "CsparseMatrix")
rownames(counts) <- readLines(file.path(in_dir, "genes.txt"))
colnames(counts) <- readLines(file.path(in_dir, "barcodes.txt"))
slide <- read.csv(file.path(in_dir, "slide.csv"), stringsAsFactors = FALSE)
slide$tissue <- factor(slide$tissue)
keep <- readLines(file.path(in_dir, "keep.txt"))

started <- proc.time()[["elapsed"]]
# gene_cutoff = 0: every gene we export is one undiffuse corrects, so none may be filtered out.
slide_obj <- suppressWarnings(createSlide(counts, slide, gene_cutoff = 0, verbose = FALSE))
decont_obj <- spotclean(slide_obj, gene_keep = keep, verbose = FALSE)
seconds <- proc.time()[["elapsed"]] - started

decont <- SummarizedExperiment::assays(decont_obj)$decont
meta <- S4Vectors::metadata(decont_obj)
writeMM(as(decont, "CsparseMatrix"), file.path(out_dir, "decont.mtx"))
writeLines(rownames(decont), file.path(out_dir, "decont_genes.txt"))
writeLines(colnames(decont), file.path(out_dir, "decont_barcodes.txt"))
writeLines(rjson::toJSON(list(
    seconds = seconds,
    version = as.character(packageVersion("SpotClean")),
    r_version = R.version.string,
    bleeding_rate = meta$bleeding_rate,
    distal_rate = meta$distal_rate,
    contamination_radius = meta$contamination_radius,
    em_iterations = length(meta$loglh),
    decontaminated_genes = length(meta$decontaminated_genes)
)), file.path(out_dir, "meta.json"))
