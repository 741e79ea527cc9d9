// SPDX-License-Identifier: Apache-2.0
int kvq_consumer_cuda_devices() { return 0; }
