# The CUDA sources of moequant::cuda, listed explicitly (no globbing).
set(MOEQUANT_CUDA_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/src/quant_pack.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/hessian.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/api.cpp
)
