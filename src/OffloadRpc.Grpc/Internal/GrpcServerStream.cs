using global::Grpc.Core;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>
/// A streamed result over gRPC: the call starts on the first MoveNextAsync; each item is a message of
/// frames (an item head, then its buffers in chunks), valid until the next MoveNextAsync; the reply's
/// head ends the stream, a status with a fault ends it with that exception after the items before it.
/// Backpressure is HTTP/2's flow control: the server writes no faster than this side reads.
/// </summary>
internal sealed class GrpcServerStream<T> : IAsyncEnumerable<T>, IAsyncEnumerator<T>
{
    private readonly GrpcInvoker _invoker;
    private readonly MethodDescriptor<T> _method;
    private readonly CancellationToken _callToken;
    private MessageBuilder? _request;
    private CancellationTokenSource? _cancel;
    private CancellationToken _enumeratorToken;
    private IDisposable? _call;
    private OutgoingMessage? _message;
    private IAsyncStreamReader<Frame>? _frames;
    private RpcReply _item;
    private bool _hasItem;
    private T _current = default!;
    private int _enumerated;
    private bool _finished;

    public GrpcServerStream(GrpcInvoker invoker, MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken)
    {
        _invoker = invoker;
        _method = method;
        _request = request;
        _callToken = cancellationToken;
    }

    public T Current => _current;

    public IAsyncEnumerator<T> GetAsyncEnumerator(CancellationToken cancellationToken = default)
    {
        if (Interlocked.Exchange(ref _enumerated, 1) != 0)
        {
            throw new InvalidOperationException($"The stream of {_method.FullName} is enumerated once: each enumeration would be another call. Call the method again instead.");
        }

        _enumeratorToken = cancellationToken;
        return this;
    }

    public async ValueTask<bool> MoveNextAsync()
    {
        ReleaseItem();
        if (_finished)
        {
            return false;
        }

        CancellationToken token = default;
        try
        {
            if (_frames is null)
            {
                await StartAsync().ConfigureAwait(false);
            }

            token = _cancel!.Token;
            var assembler = new MessageAssembler(_invoker.MaxBodyBytes);
            try
            {
                while (await _frames!.MoveNext(token).ConfigureAwait(false))
                {
                    if (!assembler.Accept(_frames.Current))
                    {
                        continue;
                    }

                    if (assembler.HeadKind == FrameKind.ItemHead)
                    {
                        _item = new RpcReply(new GrpcReply(assembler, _invoker.Connection), 0);
                        _hasItem = true;
                        _current = _invoker.DecodeItem(_method.Decoder, _item);
                        return true;
                    }

                    assembler.Dispose(); // the reply: the stream is over
                    _finished = true;
                    return false;
                }
            }
            catch
            {
                if (!_hasItem)
                {
                    assembler.Dispose();
                }

                throw;
            }

            assembler.Dispose();
            throw new ProtocolViolationException($"The stream of {_method.FullName} ended without its reply.");
        }
        catch (Exception ex)
        {
            _finished = true;
            throw _invoker.Translate(ex, _method, null, token.IsCancellationRequested ? token : _callToken);
        }
    }

    private async Task StartAsync()
    {
        MessageBuilder request = _request!;
        _request = null;
        _cancel = CancellationTokenSource.CreateLinkedTokenSource(_callToken, _enumeratorToken);
        if (request.HasDeferredPayloads)
        {
            try
            {
                await request.GatherAsync(_cancel.Token).ConfigureAwait(false);
            }
            catch
            {
                request.Discard();
                throw;
            }
        }

        OutgoingMessage message;
        try
        {
            message = OutgoingMessage.Create(request.WrittenBody, request.Payloads);
        }
        finally
        {
            request.Return();
        }

        _message = message; // gRPC serializes the request after the call starts: kept until the stream is disposed
        {
            var options = new CallOptions(_invoker.Headers(), null, _cancel.Token);
            if (message.IsSingleFrame)
            {
                AsyncServerStreamingCall<Frame> call = _invoker.Channel.AsyncServerStreamingCall(_invoker.MethodOf(_method), null, options, message.Head);
                _call = call;
                _frames = call.ResponseStream;
            }
            else
            {
                AsyncDuplexStreamingCall<Frame, Frame> call = _invoker.Channel.AsyncDuplexStreamingCall(_invoker.MethodOf(_method), null, options);
                _call = call;
                foreach (Frame frame in message.Frames())
                {
                    await call.RequestStream.WriteAsync(frame, _cancel.Token).ConfigureAwait(false);
                }

                await call.RequestStream.CompleteAsync().ConfigureAwait(false);
                _frames = call.ResponseStream;
            }
        }
    }

    private void ReleaseItem()
    {
        if (_hasItem)
        {
            _hasItem = false;
            _current = default!;
            _item.Dispose();
        }
    }

    public ValueTask DisposeAsync()
    {
        ReleaseItem();
        _request?.Discard();
        _request = null;
        if (!_finished)
        {
            _cancel?.Cancel(); // left early: the server's producer is cancelled
        }

        _finished = true;
        _call?.Dispose();
        _message?.Dispose();
        _message = null;
        _cancel?.Dispose();
        return ValueTask.CompletedTask;
    }
}
