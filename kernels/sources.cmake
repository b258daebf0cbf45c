# The CUDA sources of moequant::cuda, listed explicitly (no globbing).
set(MOEQUANT_CUDA_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/src/quant_pack.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/hessian.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/hessian_gather_tc.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/api.cpp
  ${CMAKE_CURRENT_LIST_DIR}/src/hessian_update.cpp
  ${CMAKE_CURRENT_LIST_DIR}/src/gptq_batched.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/gptq_factor.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/gptq_format.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/hadamard.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/gptq_api.cpp
  ${CMAKE_CURRENT_LIST_DIR}/src/format.cu
  ${CMAKE_CURRENT_LIST_DIR}/src/api_format.cpp
)
