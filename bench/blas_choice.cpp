#include <cblas.h>
#include <chrono>
#include <cstdio>
#include <vector>
#include <random>
static double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
int main(){
  std::mt19937 g(1); std::uniform_real_distribution<float> u(-1,1);
  struct S{int m,n,k;}; S ss[]={{64,2048,512},{64,512,1024},{64,32000,512},{1,2048,512},{1,512,1024},{1,32000,512},{2048,2048,2048}};
  for(auto s:ss){
    std::vector<float> A((size_t)s.m*s.k),B((size_t)s.n*s.k),C((size_t)s.m*s.n);
    for(auto&x:A)x=u(g); for(auto&x:B)x=u(g);
    int reps = s.m==2048?3:(s.m==1?2000:100);
    auto run=[&]{ if(s.m==1) cblas_sgemv(CblasRowMajor,CblasNoTrans,s.n,s.k,1.f,B.data(),s.k,A.data(),1,0.f,C.data(),1);
      else cblas_sgemm(CblasRowMajor,CblasNoTrans,CblasTrans,s.m,s.n,s.k,1.f,A.data(),s.k,B.data(),s.k,0.f,C.data(),s.n);};
    run(); double t=now(); for(int r=0;r<reps;r++) run(); t=(now()-t)/reps;
    printf("m=%d n=%d k=%d  %.3f ms  %.1f GFLOP/s  %.1f GB/s(w)\n",s.m,s.n,s.k,t*1e3,2.0*s.m*s.n*s.k/t/1e9, 4.0*s.n*s.k/t/1e9);
  }
}
