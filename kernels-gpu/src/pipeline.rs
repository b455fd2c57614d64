//! Producer / consumer pipelines over shared-memory barriers (sm_90). A pipeline is `S` stages, each a
//! `full` barrier (the producer's one arrival plus the bytes of the copies that fill the stage) and an
//! `empty` barrier (one arrival per consumer once it is done reading). Both sides walk the stages in the
//! same order with a `Stage` each; a stage's phase flips every time the ring wraps, and each wait names
//! the parity of the phase it waits for, so neither side ever resets a barrier.
use crate::arch::mbarrier;

/// A position in a ring of `S` stages.
#[derive(Clone, Copy)]
pub struct Stage<const S: u32> {
    pub index: u32,
    phase: u32,
}

impl<const S: u32> Stage<S> {
    pub const START: Stage<S> = Stage { index: 0, phase: 0 };

    #[inline(always)]
    pub fn advance(&mut self) {
        self.index += 1;
        if self.index == S {
            self.index = 0;
            self.phase ^= 1;
        }
    }
}

/// `S` stages' barriers at a shared address: the full barriers, then the empty ones.
#[derive(Clone, Copy)]
pub struct Pipeline<const S: u32> {
    bars: u32,
}

impl<const S: u32> Pipeline<S> {
    /// Shared-memory bytes of the barriers.
    pub const BYTES: u32 = 16 * S;

    #[inline(always)]
    pub fn at(bars: u32) -> Pipeline<S> {
        Pipeline { bars }
    }
    #[inline(always)]
    fn full(&self, i: u32) -> u32 {
        self.bars + 8 * i
    }
    #[inline(always)]
    fn empty(&self, i: u32) -> u32 {
        self.bars + 8 * (S + i)
    }

    /// One thread, before any other use (then `mbarrier::fence_init` and a block barrier).
    #[inline(always)]
    pub unsafe fn init(&self, consumers: u32) {
        unsafe { self.init_with(1, consumers) }
    }

    /// `init` with `producers` arrivals per fill of a stage (the announcing one plus, say, cp.async
    /// arrivals of the threads that copy part of it).
    #[inline(always)]
    pub unsafe fn init_with(&self, producers: u32, consumers: u32) {
        for i in 0..S {
            unsafe {
                mbarrier::init(self.full(i), producers);
                mbarrier::init(self.empty(i), consumers);
            }
        }
    }

    /// Producer: wait until every consumer released stage `s` (its previous round; free on the first).
    #[inline(always)]
    pub unsafe fn producer_acquire(&self, s: Stage<S>) {
        unsafe { mbarrier::wait(self.empty(s.index), s.phase ^ 1) }
    }

    /// The barrier stage `s`'s copies complete on (for producer threads other than the one that
    /// announced them).
    #[inline(always)]
    pub fn full_barrier(&self, s: Stage<S>) -> u32 {
        self.full(s.index)
    }

    /// Producer: announce `bytes` of copies into stage `s`; returns the barrier the copies complete on.
    #[inline(always)]
    pub unsafe fn producer_expect(&self, s: Stage<S>, bytes: u32) -> u32 {
        let bar = self.full(s.index);
        unsafe { mbarrier::arrive_expect_tx(bar, bytes) };
        bar
    }

    /// Consumer: wait until stage `s` has landed.
    #[inline(always)]
    pub unsafe fn consumer_wait(&self, s: Stage<S>) {
        unsafe { mbarrier::wait(self.full(s.index), s.phase) }
    }

    /// Consumer (one thread per consumer): done reading stage `s`.
    #[inline(always)]
    pub unsafe fn consumer_release(&self, s: Stage<S>) {
        unsafe { mbarrier::arrive(self.empty(s.index)) }
    }
}
